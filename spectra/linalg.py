"""Exact spectra of weight updates: the singular values of ``(..., out, in)`` matrices.

Pure, device-agnostic tensor code: every function takes tensors on any device and a ``dtype`` for
the decomposition, and returns float64 numpy arrays (sums over a spectrum are always float64, SPEC.md).

Two exact methods:

``"gram"`` (default)
    Form the smaller Gram matrix ``G = M Mᵀ`` (out <= in) or ``Mᵀ M`` (p × p, p = min(out, in)) and
    take its eigenvalues with the divide-and-conquer symmetric eigensolver (LAPACK ``syevd`` on the
    CPU, cuSOLVER on CUDA); ``σᵢ = sqrt(max(λᵢ, 0))``. On this project's 2-core CPU, 2048×5632 takes
    about 1.3 s in float64 against about 60 s for ``torch.linalg.svd``.

    Precision: eigenvalues of G carry an absolute error of about ``p · eps · σ₁²``. In float64
    (eps ≈ 1.1e-16) singular values are accurate down to ≈ 1e-7·σ₁, so energy ranks, norms, stable
    and effective rank are exact for any practical purpose. In float32 (eps ≈ 6e-8) energy ranks and
    Frobenius/spectral norms stay exact but singular values below ≈ 3e-3·σ₁ become noise, which
    inflates the nuclear norm and effective rank of low-rank updates: use float32 only for speed,
    and never for a low-rank (LoRA-like) matrix.

``"svd"``
    ``torch.linalg.svdvals`` in the requested dtype: backward-stable, every singular value
    accurate to ``eps · σ₁``; slower on the CPU by 10-50×.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Method = Literal["gram", "svd"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gram(M: torch.Tensor, *, dtype: torch.dtype = torch.float64, block_bytes: int = 64 << 20) -> torch.Tensor:
    """The smaller Gram matrix of ``M``, accumulated in ``dtype``.

    Args:
        M: tensor of shape ``(..., out, in)``.
        dtype: precision of the products and the sum.
        block_bytes: the long dimension is upcast and multiplied in blocks of at most this many
            bytes, so a float64 Gram of a float32 ``32000 × 2048`` embedding never holds a float64
            copy of the whole matrix (memory stays at one block plus the p × p result).

    Returns:
        ``(..., p, p)`` with ``p = min(out, in)``: ``M Mᵀ`` when ``out <= in`` else ``Mᵀ M``.
    """
    wide = M.shape[-2] <= M.shape[-1]
    X = M if wide else M.mT  # (..., p, long): G = X Xᵀ = Σ_blocks X_b X_bᵀ
    p, long = X.shape[-2], X.shape[-1]
    per_col = max(1, p * torch.empty(0, dtype=dtype).element_size() * max(1, X[..., 0, 0].numel()))
    step = max(1, min(long, block_bytes // per_col))
    if step >= long:
        Xd = X.to(dtype)
        return Xd @ Xd.mT
    G = torch.zeros(*X.shape[:-2], p, p, dtype=dtype, device=M.device)
    for start in range(0, long, step):
        Xb = X[..., start : start + step].to(dtype)
        G.addmm_(Xb, Xb.mT) if G.ndim == 2 else G.baddbmm_(Xb, Xb.mT)
    return G


def singular_values(
    M: torch.Tensor,
    *,
    method: Method = "gram",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """All singular values of ``M`` (or of each matrix in a batch), descending.

    Args:
        M: ``(out, in)`` or ``(batch, out, in)`` float tensor on any device.
        method: ``"gram"`` (eigenvalues of the smaller Gram matrix) or ``"svd"``; see the module
            docstring for their precision.
        dtype: precision of the decomposition (float64 or float32).

    Returns:
        float64 array of shape ``(p,)`` or ``(batch, p)``, ``p = min(out, in)``, non-negative,
        descending.

    Example:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> singular_values(M).round(6).tolist()
        [3.0, 2.0, 1.0]
    """
    if M.ndim not in (2, 3):
        raise ValueError(f"M must have shape (out, in) or (batch, out, in). Got {tuple(M.shape)} instead.")
    if min(M.shape[-2:]) == 0:
        return np.zeros(M.shape[:-2] + (0,), dtype=np.float64)
    if method == "gram":
        lam = torch.linalg.eigvalsh(gram(M, dtype=dtype))  # ascending
        s = lam.clamp_min_(0).sqrt_().flip(-1)
    elif method == "svd":
        s = torch.linalg.svdvals(M.to(dtype))
    else:
        raise ValueError(f"method must be 'gram' or 'svd'. Got {method!r} instead.")
    return s.double().cpu().numpy()


def fro_norm(M: torch.Tensor, *, block: int = 1 << 23) -> float:
    """Frobenius norm of ``M``, accumulated in float64 over blocks of ``block`` elements (no full
    float64 copy of a large matrix)."""
    flat = M.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), block):
        chunk = flat[start : start + block].double()
        total += float(torch.dot(chunk, chunk).item())
    return total**0.5
