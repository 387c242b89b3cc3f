"""Shared fixtures: checkpoint writers and float64 references."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[None]:
    """``folder`` locked by another live process (a child holding an ``OutputLock``) while the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from spectra.io.files import OutputLock; lock = OutputLock.acquire(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def reference_energy_rank(S: np.ndarray, tau: float) -> tuple[int, bool]:
    """float64 reference energy rank and whether it is safely away from the threshold.

    Returns ``(k, clear)``; ``clear`` is False when some cumulative energy is within 1e-6 (relative)
    of τ·total, where float rounding may legitimately move the rank by one.
    """
    e = np.cumsum(S.astype(np.float64) ** 2)
    total = e[-1]
    if total == 0:
        return 0, True
    k = int(np.argmax(e >= tau * total)) + 1
    clear = bool(np.min(np.abs(e / total - tau)) > 1e-6)
    return k, clear


def svd64(M: torch.Tensor | np.ndarray) -> np.ndarray:
    """Singular values by numpy's float64 SVD (the independent oracle)."""
    A = M.double().numpy() if isinstance(M, torch.Tensor) else np.asarray(M, dtype=np.float64)
    return np.linalg.svd(A, compute_uv=False)


def random_lora(model, seed: int, **lora_kwargs):
    """``model`` wrapped by PEFT with a LoRA of random, non-zero factors (``init_lora_weights=False``) drawn
    after ``torch.manual_seed(seed)``; DoRA magnitudes, which start at the weight's row norms, are moved
    by up to 10% so that a DoRA update is not trivial either."""
    import peft

    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                prm.mul_(1 + 0.1 * torch.rand_like(prm))
    return peft_model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def wait_for_journal(proc: subprocess.Popen, journal: Path, lines: int = 3, timeout: float = 120,
                     ready=lambda: True) -> None:
    """Wait until the run ``proc`` has journaled ``lines`` results (and ``ready()`` holds), so that
    it can be interrupted mid-way; fail the test if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready() and journal.is_file() and len(journal.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    out = proc.communicate()[1] if proc.poll() is not None else ""
    pytest.fail(f"the run ended (or stalled) before it could be interrupted; make the test pair larger. {str(out)[-2000:]}")


def tiny_llama(*, tie: bool = False, vocab: int = 64, layers: int = 2, seed: int = 0):
    """A random tiny ``LlamaForCausalLM`` (hidden 32, MLP 64, 4 heads / 2 kv heads), float32, seeded."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    return T.LlamaForCausalLM(cfg).float()


def weight_folders(root: Path, weights: dict[str, torch.Tensor], name: str) -> dict[str, Path]:
    """Each float64 weight of ``weights`` (who -> tensor) saved as float32 ``name`` in
    ``root/<who>/model.safetensors``; who -> its folder."""
    from safetensors.torch import save_file

    out = {}
    for who, w in weights.items():
        (root / who).mkdir(parents=True)
        save_file({name: w.float()}, root / who / "model.safetensors")
        out[who] = root / who
    return out
