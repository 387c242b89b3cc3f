"""The files around an extraction (``spectra extract``): the output folder (refused when it is an
input's, prepared for a run), the adapter's storage dtype, and norms read from the inputs, among them
those of the matrices left out, computed beside the pass."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError
from spectra.extract_plan import ExtractConfig
from spectra.extract_results import compared_rows, left_out_record, reads_pair_by_rows
from spectra.io.adapter import Adapter
from spectra.io.checkpoint import Checkpoint, tensor_infos
from spectra.lowrank import factored_triplets
from spectra.selection import Task
from spectra.threads import one_openmp_thread

JOURNAL = "extract.jsonl"
SCRATCH = ".extract-scratch"
#: Files a run writes; a folder holding anything else (or a finished run) is refused without ``force``.
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "extract.json", "extract.csv", "extract.png",
                "extract_ranks.png", JOURNAL, SCRATCH)


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse a folder that holds anything unless resuming or forced; with ``force`` remove what a
    previous run wrote (only spectra's own files)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path exists and is not a folder", path=out, hint="choose a folder for --out")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not resume and not force:
        raise ConfigError(f"the output folder is not empty ({', '.join(present[:3])}{'…' if len(present) > 3 else ''})",
                          path=out, hint="choose an empty or new folder, pass --force to overwrite, or --resume to finish an interrupted run")
    if force and not resume:
        for name in [*OUTPUT_FILES, *(p.name for p in out.glob("uniform_r*") if p.is_dir())]:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def refuse_an_input_folder(out: Path, *inputs: str | Checkpoint) -> None:
    """An output folder that is an input's folder would be overwritten (``--force`` first deletes the
    adapter files a run writes, which are an adapter input's own): refused before anything is touched."""
    target = out.resolve()
    for x in inputs:
        where = Path(getattr(x, "root", None) or x.label) if isinstance(x, Checkpoint) else Path(x)
        try:
            where = where.resolve()
        except OSError:
            continue
        # a folder input (a model, an adapter) holds files the run writes; a lone file only if it has such a name
        folder = where if where.is_dir() else where.parent
        if target == folder and (where.is_dir() or where.name in OUTPUT_FILES):
            raise ConfigError(f"--out is the folder of the input {x.label if isinstance(x, Checkpoint) else x}: the run "
                              "would overwrite (with --force: delete) its files", path=out,
                              hint="choose another folder for --out: a resized adapter is written beside the one it comes from")


def out_dtype(config: ExtractConfig, stored: list[str]) -> torch.dtype:
    """The adapter's storage dtype: ``--dtype``, or the tuned tensors' most common one (bfloat16 for fp8/int8)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    common = max(set(stored), key=stored.count) if stored else "float32"
    return getattr(torch, common) if common in ("float64", "float32", "float16", "bfloat16") else torch.bfloat16


def adapter_dtype(adapter: Adapter) -> str:
    """The dtype most of an adapter's stored tensors have (``"float32"`` when it holds none)."""
    f = next(adapter.path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter.path / n).is_file())
    dtypes = [i.dtype for i in tensor_infos(f).values()]
    return max(set(dtypes), key=dtypes.count) if dtypes else "float32"


def lora_fro(mod: Any) -> float:
    """‖s·B·A‖_F from the factors (QR and an r × r SVD; the product is never formed)."""
    Bf, Af = mod.factors()
    return factored_triplets(Bf, Af, mod.scale, 0).total ** 0.5


def tensor_fro(ckpt: Checkpoint, name: str | None) -> float | None:
    """‖W‖_F of a stored tensor in float64, or None when there is no such tensor."""
    if name is None or name not in ckpt.tensors:
        return None
    return float(torch.linalg.vector_norm(ckpt.load(name).double()).item())


#: Left-out matrices (embeddings, the head) have their norms computed on a thread beside the pass, a
#: block of rows at a time; one that can only be read whole (a ``.bin`` file, a quantised tensor) and
#: whose pair is above this many stored bytes goes first and alone instead, so that the run's peak
#: memory is the larger of the two, not their sum.
LEFT_OUT_BESIDE_BYTES = 256 << 20


def left_out_records(base: Checkpoint, tuned: Checkpoint | None, left_out: list[tuple[Any, str]]) -> Callable[[], list[dict]]:
    """Start the records of the matrices not extracted (:func:`~spectra.extract_results.left_out_record`;
    ``left_out``: ``(Task or (name, shape, fro, base_fro), reason)`` pairs); the function returned
    gives them, re-raising a read error. They are computed on a thread while the pass runs, reading
    blocks of rows (on the 135M-layout pair, the 113 MB embedding pair: 0.1-0.25 s that had kept a core
    idle); a large one that can only be read whole goes first, alone (:data:`LEFT_OUT_BESIDE_BYTES`)."""
    def records() -> list[dict]:
        return [left_out_record(base, tuned, what, why) for what, why in left_out]

    size = sum(what.pair.stored_bytes for what, _ in left_out if isinstance(what, Task)
               and not reads_pair_by_rows(base, what.pair.base.name, tuned, what.pair.tuned.name, compared_rows(what)))
    if not left_out or size > LEFT_OUT_BESIDE_BYTES:
        done = records()
        return lambda: done
    box: dict[str, Any] = {}

    def run() -> None:
        one_openmp_thread()  # beside the compute threads, not over them
        try:
            box["records"] = records()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="spectra-left-out", daemon=True)
    thread.start()

    def result() -> list[dict]:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["records"]

    return result


__all__ = ["JOURNAL", "LEFT_OUT_BESIDE_BYTES", "OUTPUT_FILES", "SCRATCH", "adapter_dtype", "left_out_records", "lora_fro",
           "out_dtype", "prepare_out", "refuse_an_input_folder", "tensor_fro"]
