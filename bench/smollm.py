"""A real-layout ~135M checkpoint pair for the benchmarks: SmolLM2-135M's shapes, random weights.

SmolLM2-135M (``config.json``): hidden 576, 30 layers, 9 attention heads and 3 key/value heads of
64, MLP 1536, vocabulary 49152, tied embedding. So each layer has q/o ``576 × 576``, k/v
``192 × 576``, gate/up ``1536 × 576``, down ``576 × 1536``; with the ``49152 × 576`` embedding that
is 211 matrices. The base is ``transformers.LlamaForCausalLM`` with that config and its own random
initialisation (N(0, 0.02²)); the tuned copy adds to every matrix a full-rank-ish update like a
fine-tune's: dense Gaussian noise plus a rank-16 part of equal norm, 1% of ‖W‖_F in all
(the spectrum is 16 spikes over a Marchenko–Pastur bulk, so the energy ranks at 0.9 and 0.99 fall in
the bulk, as they do for full fine-tuning). Both are saved as float32 safetensors with config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=100000.0)

#: ‖ΔW‖_F / ‖W‖_F of the update, and the rank of its low-rank part.
REL_UPDATE = 0.01
UPDATE_RANK = 16


def update(W: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A fine-tune-like ``(out, in)`` float32 update of ``W``: noise plus a rank-16 part, each half of
    the energy, ``‖ΔW‖_F = REL_UPDATE · ‖W‖_F``."""
    out_dim, in_dim = W.shape
    noise = torch.randn(out_dim, in_dim, generator=gen)
    low = torch.randn(out_dim, UPDATE_RANK, generator=gen) @ torch.randn(UPDATE_RANK, in_dim, generator=gen)
    target = REL_UPDATE * float(torch.linalg.vector_norm(W)) / 2**0.5
    return noise * (target / float(torch.linalg.vector_norm(noise))) + low * (target / float(torch.linalg.vector_norm(low)))


def write_pair(out: Path, *, layers: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/tuned`` (model.safetensors + config.json, float32); return both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    model = LlamaForCausalLM(config).float()
    base, tuned = out / "base", out / "tuned"
    model.save_pretrained(base, safe_serialization=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param += update(param, gen)
            else:  # norms move a little too, as in a fine-tune (1-D: not analysed)
                param += 1e-3 * torch.randn(param.shape, generator=gen)
    model.save_pretrained(tuned, safe_serialization=True)
    (out / "pair.json").write_text(json.dumps({"config": config.to_dict(), "rel_update": REL_UPDATE, "update_rank": UPDATE_RANK,
                                               "seed": seed}, indent=1, default=str))
    return base, tuned
