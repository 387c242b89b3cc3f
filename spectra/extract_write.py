"""Writing the adapter of a ``spectra extract`` run: ``adapter_model.safetensors`` streamed one module at a time
from the scratch shard, and ``adapter_config.json`` (:mod:`spectra.io.peft_writer`).

Modules are written as PEFT LoRA modules; biases and whole modules (norms, a task head) from ``not_lora``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectra.extract_plan import ExtractConfig
from spectra.extract_results import ExtractResult
from spectra.io.peft_writer import (
    LoraFactors,
    adapter_config,
    lora_layout,
    lora_tensors,
    saved_name,
    write_adapter,
)

if TYPE_CHECKING:  # extract imports this module: its run types are named for the checker only
    from spectra.extract import ExtractSource
    from spectra.extract_io import ExtractRun


def adapter_files(src: ExtractSource, run: ExtractRun, ranks: list[int], config: ExtractConfig,
                  not_lora: list[dict]) -> tuple[list[tuple[str, tuple[int, ...]]], Iterator[torch.Tensor], dict[str, Any]]:
    """The adapter at ``ranks`` as ``(layout, tensors, config)``: the names and shapes of every tensor,
    a generator loading them one module at a time from the scratch shard (memory: one module), and
    ``adapter_config.json``. ``src``: the run's source (``spectra.extract.ExtractSource``); ``run``: its
    :class:`spectra.extract_io.ExtractRun`. Biases and saved modules come from ``not_lora``."""
    def as_loaded(module: str) -> str:  # the module's path once transformers >= 5 loads the model
        return src.renames.get(module, module)

    biases = {as_loaded(r["module"]): r["delta"] for r in not_lora if r.get("held") == "lora_bias"}
    full = {f"{as_loaded(n.rpartition('.')[0])}.{n.rpartition('.')[2]}" if "." in n else n: v
            for r in not_lora if r.get("held") == "modules_to_save" for n, v in r["tensors"].items()}
    chosen = [(i, t, r) for i, (t, r) in enumerate(zip(src.targets, ranks)) if r]
    layout = [e for i, t, r in chosen for e in lora_layout(t.module, r, t.shape, embedding=t.embedding, bias=bool(biases))]
    layout += [(saved_name(n), tuple(v.shape)) for n, v in full.items()]

    def tensors() -> Iterator[torch.Tensor]:
        for i, t, r in chosen:
            B, A = run.load(i, r)
            # lora_bias is one flag for every adapted module: zeros where the bias did not change
            bias = (biases.get(t.module, torch.zeros(t.shape[0])) if biases else None)
            yield from (x for _, x in lora_tensors(LoraFactors(t.module, B, A, t.embedding, bias)))
        yield from full.values()

    adapted = {t.module: r for i, t, r in chosen}
    groups = [ranks[i] for g in run.plan.groups.values() for i in g if ranks[i]]
    # every module with a weight, of any rank (a Conv3d patch embedding is a module a short target would reach too)
    all_modules = [as_loaded(n[: -len(".weight")].removeprefix(src.base_prefix)) for n in src.base.tensors if n.endswith(".weight")]
    cfg = adapter_config(adapted, all_modules=all_modules, base_model=src.base.label, task_type=src.task_type, rslora=config.rslora,
                         fan_in_fan_out=any(t.conv1d for i, t, r in chosen),
                         modules_to_save=sorted({as_loaded(r["module"]) for r in not_lora if r.get("held") == "modules_to_save"}),
                         lora_bias=bool(biases), shared_rank=groups[0] if groups else None)
    return layout, tensors(), cfg


def write_extracted(out: Path, src: ExtractSource, run: ExtractRun, ranks: list[int], config: ExtractConfig, dtype: torch.dtype,
                    not_lora: list[dict], result: ExtractResult) -> None:
    """Write the adapter into ``out`` (:func:`adapter_files`, :func:`spectra.io.peft_writer.write_adapter`) and say
    what was written in ``result.adapter`` (``saved_params``: entries of the tensors stored whole)."""
    layout, tensors, cfg = adapter_files(src, run, ranks, config, not_lora)
    files = write_adapter(out, layout, tensors, cfg, dtype)
    whole = {n: v for r in not_lora if r.get("held") == "modules_to_save" for n, v in r["tensors"].items()}  # a module's records share them
    saved = sum(v.numel() for v in whole.values())
    result.adapter = {"path": str(out), "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": cfg["use_rslora"],
                      "target_modules": cfg["target_modules"], "modules_to_save": cfg["modules_to_save"], "saved_params": saved,
                      "lora_bias": cfg["lora_bias"], "fan_in_fan_out": cfg["fan_in_fan_out"], "task_type": cfg["task_type"],
                      "dtype": str(dtype).removeprefix("torch."), "bytes": sum(f.stat().st_size for f in files),
                      "tensors": len(layout)}


__all__ = ["adapter_files", "write_extracted"]
