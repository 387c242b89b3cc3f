"""Checkpoint pairs with planted, known update spectra, for the demo, tests and benchmarks.

A "fine-tune-like" update ΔW = U diag(s) Vᵀ has random orthonormal U, V and a power-law spectrum
``sᵢ ∝ i^(−α)``: attention updates decay faster (lower rank needed) than MLP updates, and later
layers move more, as reported for real full fine-tunes. Weights are stored in bf16 like released
checkpoints, so the stored ΔW also carries bf16 rounding noise, as a real one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-architecture shape.

    Attributes:
        layers: decoder layers.
        hidden: model width (q_proj/o_proj are hidden × hidden).
        intermediate: MLP width (gate/up: intermediate × hidden; down: hidden × intermediate).
        heads: attention heads; head_dim = hidden // heads.
        kv_heads: key/value heads (GQA): k_proj/v_proj have kv_heads · head_dim rows.
        vocab: vocabulary size (embed_tokens, lm_head).
    """

    layers: int = 4
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        """A transformers ``LlamaConfig``-compatible ``config.json``."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        }

    def matrices(self) -> dict[str, tuple[int, int]]:
        """Tensor name -> ``(out, in)`` for every weight matrix."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for l in range(self.layers):
            p = f"model.layers.{l}."
            out.update({
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        out["lm_head.weight"] = (self.vocab, h)
        return out


#: Power-law exponent α of the planted update spectrum per module (larger: more low-rank).
DEFAULT_ALPHA = {"q_proj": 1.0, "k_proj": 1.0, "v_proj": 0.7, "o_proj": 0.7, "gate_proj": 0.5,
                 "up_proj": 0.5, "down_proj": 0.55, "embed_tokens": 1.2, "lm_head": 0.9}


def planted_matrix(shape: tuple[int, int], singular_values: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """``U diag(s) Vᵀ`` (float64) with Haar-random orthonormal U ``(out, k)``, V ``(in, k)``, k = len(s)."""
    out_dim, in_dim = shape
    k = singular_values.numel()
    U, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=generator, dtype=torch.float64))
    return (U * singular_values.double()) @ V.T


def power_law(p: int, alpha: float) -> torch.Tensor:
    """``sᵢ = i^(−α)`` for i = 1..p, float64."""
    return torch.arange(1, p + 1, dtype=torch.float64) ** (-alpha)


def make_llama_pair(
    out_dir: str | Path,
    *,
    shape: LlamaShape = LlamaShape(),
    seed: int = 0,
    rel_update: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Path, Path]:
    """Write ``out_dir/base`` and ``out_dir/tuned`` model folders (``model.safetensors`` + ``config.json``).

    Args:
        out_dir: destination; created if missing.
        shape: the architecture's sizes.
        seed: seed of every random draw (same seed, same files).
        rel_update: ``‖ΔW‖_F / ‖W_base‖_F`` of layer 0; it grows linearly to 2× in the last layer.
        dtype: storage dtype of both checkpoints.

    Returns:
        ``(base_folder, tuned_folder)``.
    """
    g = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    base_sd, tuned_sd = {}, {}
    for name, (o, i) in shape.matrices().items():
        base = torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
        module = name.split(".")[-2]
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        s = power_law(min(o, i), DEFAULT_ALPHA[module])
        delta = planted_matrix((o, i), s, generator=g)
        scale = rel_update * (1 + layer / max(1, shape.layers - 1))
        delta *= scale * torch.linalg.norm(base) / torch.linalg.norm(delta)
        base_sd[name] = base.to(dtype).contiguous()
        tuned_sd[name] = (base + delta).to(dtype).contiguous()
    for l in range(shape.layers):  # norms: 1-D tensors real checkpoints carry (reported as skipped)
        for n in ("input_layernorm", "post_attention_layernorm"):
            base_sd[f"model.layers.{l}.{n}.weight"] = torch.ones(shape.hidden, dtype=dtype)
            tuned_sd[f"model.layers.{l}.{n}.weight"] = torch.ones(shape.hidden, dtype=dtype)
    base_sd["model.norm.weight"] = tuned_sd["model.norm.weight"] = torch.ones(shape.hidden, dtype=dtype)
    folders = []
    for sub, sd in (("base", base_sd), ("tuned", tuned_sd)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


__all__ = ["LlamaShape", "make_llama_pair", "planted_matrix", "power_law"]
