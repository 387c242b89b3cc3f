"""A few real optimisation steps on a tiny Llama, on text that ships with Python, for tests.

Byte-level tokens (vocab 256) from ``pydoc_data.topics``; LoRA runs through PEFT, full fine-tuning
updates every weight. Seeds fixed, CPU, seconds per run.
"""

from __future__ import annotations

from pathlib import Path

import torch


def corpus_tokens(n: int = 60_000) -> torch.Tensor:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.tensor(list(text.encode("utf-8")[:n]), dtype=torch.long)


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def tiny_mixtral(seed: int = 0):
    """Mixtral (hidden 32, intermediate 48, 2 layers of 3 experts, vocabulary 64), float32, initialised after
    ``torch.manual_seed(seed)``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def byte_llama_pair(root: Path, edit) -> tuple[Path, Path]:
    """``root/base`` (a byte-level Llama: vocabulary 256, no tokenizer files, hidden 32, 2 layers) and ``root/tuned``,
    its weights passed through ``edit(name, tensor) -> tensor`` (with its config.json): a pair ``--eval`` can score."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    cfg = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    sd = load_file(str(root / "base" / "model.safetensors"))
    (root / "tuned").mkdir()
    save_file({k: edit(k, v) for k, v in sd.items()}, str(root / "tuned" / "model.safetensors"))
    shutil.copy(root / "base" / "config.json", root / "tuned")
    return root / "base", root / "tuned"


def base_and_text(root: Path, n_bytes: int) -> tuple[Path, Path]:
    """``root/base`` (:func:`tiny_llama`: byte-level, no tokenizer files) and ``root/data.txt``, its first ``n_bytes``
    of :func:`corpus_tokens` as text: what ``spectra train`` needs."""
    tiny_llama().save_pretrained(root / "base")
    (root / "data.txt").write_bytes(bytes(corpus_tokens(n_bytes).tolist()))
    return root / "base", root / "data.txt"


def train(model, tokens: torch.Tensor, *, steps: int, lr: float, seed: int, seq: int = 64, batch: int = 8) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([tokens[i : i + seq] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def make_runs(root: Path, *, steps: int = 25) -> dict[str, Path]:
    """Base (briefly pretrained), LoRA r=8, LoRA r=64, a second seed of r=8, and a full fine-tune."""
    import peft

    tokens = corpus_tokens()
    source, target = tokens[: len(tokens) // 2], tokens[len(tokens) // 2 :]
    base = tiny_llama()
    train(base, source, steps=steps, lr=3e-3, seed=0)
    base.save_pretrained(root / "base")
    out = {"base": root / "base"}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, r, seed in (("lora8", 8, 1), ("lora64", 64, 1), ("lora8b", 8, 2)):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny_llama().__class__.from_pretrained(root / "base"),
                                    peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        train(model, target, steps=steps, lr=2e-3, seed=seed)
        model.save_pretrained(root / name)
        out[name] = root / name
    full = tiny_llama().__class__.from_pretrained(root / "base")
    train(full, target, steps=steps, lr=3e-4, seed=1)
    full.save_pretrained(root / "full")
    out["full"] = root / "full"
    return out


class TokenData(torch.utils.data.Dataset):
    """64 examples of 16 random tokens below 64 (each seeded by its index), for a Trainer: labels = inputs."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}
