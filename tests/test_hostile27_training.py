"""Twenty-seventh round, recommend and training inputs (docs/bad_inputs.md, "twenty-seventh round"): a budget that
covers a LoRA diff's whole kept spectrum gave every module its full rank (the exact zeros beyond r counted as
components), a sweep resumed with its ``--data`` folder rewritten (only files were fingerprinted), and an
``--eval-source`` file inside the ``--data`` folder scored text the run trains on."""

from __future__ import annotations

import pytest
import torch

from spectra import DiffConfig, diff
from spectra.io.text_data import data_fingerprint, overlapping
from spectra.recommend import recommend
from tests.cli_util import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_a_budget_never_buys_the_zeros_beyond_a_loras_rank(tmp_path):
    from tests.conftest import random_lora

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    random_lora(model, 1, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]).save_pretrained(tmp_path / "adapter")
    for top_k in (64, 4):  # every value kept (zeros after the 4th), and only the four (lora_r says the rest are zeros)
        res = diff(str(tmp_path / "base"), str(tmp_path / "adapter"), config=DiffConfig(top_k=top_k), out_dir=tmp_path / f"d{top_k}")
        assert all(m.lora_r == 4 for m in res.modules)
        for budget in ("1e9", "100%", "5000"):
            rec = recommend(tmp_path / f"d{top_k}" / "results.json", energy=None, budget=budget)
            assert set(rec.ranks.values()) == {4}, (top_k, budget, rec.ranks)
            assert rec.params == 4 * (32 + 32) + 4 * (48 + 32)
            assert not any("binds" in n for n in rec.notes)


def test_a_data_folders_fingerprint_follows_its_files(tmp_path):
    data = tmp_path / "code"
    data.mkdir()
    (data / "a.py").write_text("print('a')\n" * 50)
    (data / "b.py").write_text("x = 1\n" * 50)
    (data / "w.bin").write_bytes(b"\0" * 10)  # not read as text: not part of it
    first = data_fingerprint(data)
    assert [f[0] for f in first] == ["a.py", "b.py"]
    (data / "w.bin").write_bytes(b"\1" * 20)
    assert data_fingerprint(data) == first
    for change in (lambda: (data / "b.py").write_text("x = 1\n" * 50 + "# more\n"), lambda: (data / "c.md").write_text("new"),
                   lambda: (data / "a.py").write_text("print('b')\n" * 50)):
        change()
        assert data_fingerprint(data) != first
        first = data_fingerprint(data)


def test_eval_source_inside_the_data_folder_is_refused(tmp_path):
    from tests.train_util import tiny_llama

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    data = tmp_path / "code"
    data.mkdir()
    (data / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    (data / "b.py").write_text("class A:\n    pass\n" * 40)
    assert overlapping(data / "a.py", data) and overlapping(data, data / "a.py") and overlapping(data, tmp_path / "." / "code")
    assert not overlapping(data / "a.py", data / "b.py")
    (data / "notes.csv").write_text("x,y\n")  # not read as text: no overlap (the review)
    (tmp_path / "else.txt").write_text("prose " * 50)
    (data / "linked.txt").symlink_to(tmp_path / "else.txt")  # read through the link: an overlap
    assert not overlapping(data / "notes.csv", data) and overlapping(tmp_path / "else.txt", data)
    for eval_source, d in ((data / "a.py", data), (data, data / "a.py")):
        r = cli(["train", "--base", str(base), "--data", str(d), "--eval-source", str(eval_source), "--steps", "2", "--batch", "2",
                 "--seq-len", "16", "-o", str(tmp_path / "out")])
        assert r.returncode != 0 and "--eval-source is --data, or inside it or holds it" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def test_a_dora_records_lora_r_does_not_end_its_spectrum(tmp_path):
    """The review: a DoRA update is dense (its magnitude rescales every row); its record's lora_r made recommend take
    the 8 kept values as the whole spectrum ("every module already holds all of its update's directions")."""
    from spectra.errors import ConfigError
    from tests.conftest import random_lora

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    random_lora(model, 1, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path / "adapter")
    diff(str(tmp_path / "base"), str(tmp_path / "adapter"), config=DiffConfig(top_k=8), out_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="needs more of the spectra than the results keep"):
        recommend(tmp_path / "d", energy=None, budget="1e9")
