"""Twenty-eighth probe round: training data (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

from spectra.io.text_data import data_fingerprint, overlapping


def test_an_edit_between_the_sampled_chunks_changes_the_data_fingerprint(tmp_path):
    # sweep --resume compared a sample of 16 chunks of 4 KiB: bytes 4100-13000 rewritten at the same size went unseen,
    # and the resumed sweep mixed a run trained on the old text with one trained on the new
    f = tmp_path / "data.txt"
    text = bytearray(b"".join(b"line %06d of the training text\n" % i for i in range(7000)))  # ~200 kB
    f.write_bytes(bytes(text))
    before = data_fingerprint(f)
    text[4100:13000] = bytes(b if b == 10 else ord("z") for b in text[4100:13000])
    f.write_bytes(bytes(text))
    assert data_fingerprint(f) != before
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "a.py").write_bytes(bytes(text))
    assert data_fingerprint(folder)[0][0] == "a.py"


def test_an_eval_source_copied_from_the_data_overlaps_it(tmp_path):
    # cp code/json___init__.py evcopy.py: a byte-identical copy passed the inode check, the forgetting score read training text
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("def f():\n    return 1\n" * 50)
    (tmp_path / "code" / "b.py").write_text("x = 2\n" * 40)
    (tmp_path / "copy.py").write_bytes((tmp_path / "code" / "a.py").read_bytes())
    (tmp_path / "other.txt").write_text("general prose about the weather " * 40)
    assert overlapping(tmp_path / "copy.py", tmp_path / "code")
    assert overlapping(tmp_path / "code", tmp_path / "copy.py")
    assert not overlapping(tmp_path / "other.txt", tmp_path / "code")
