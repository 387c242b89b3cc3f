"""A small base/tuned pair of safetensors files for tests that need any two checkpoints."""

from __future__ import annotations

import json
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


def save_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, name: str = "model.safetensors") -> Path:
    """``folder`` (made if new) holding ``tensors`` as safetensors file ``name`` and, given, ``config`` as config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder
