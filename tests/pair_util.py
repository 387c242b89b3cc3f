"""A small base/tuned pair of safetensors files for tests that need any two checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def small_pair(root: Path) -> tuple[str, str]:
    """``(base, tuned)`` paths in ``root``: two 12 × 8 up_proj matrices, the tuned ones moved by 0.1·N(0, 1)."""
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    save_file(W, str(root / "base.safetensors"))
    save_file({k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in W.items()}, str(root / "tuned.safetensors"))
    return str(root / "base.safetensors"), str(root / "tuned.safetensors")
