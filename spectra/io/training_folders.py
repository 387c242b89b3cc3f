"""Naming the sharded checkpoints of distributed training, which spectra does not read, and their converter.

DeepSpeed (a root with ``latest`` and ``global_stepN/``, holding ``*_model_states.pt`` and ``*_optim_states.pt``),
``torch.distributed.checkpoint`` (DCP: ``.metadata`` and ``*.distcp`` shards) and Accelerate's FSDP
(``pytorch_model_fsdp_0/``, a DCP folder) split the weights across files that only their own tools put back
together. Passed where a model was meant, they would read as "no model.safetensors in this folder": instead
:func:`describe_folder` and :func:`describe_file` say what they are and which command consolidates them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spectra.io.train_state import ZERO_TO_FP32

DCP_TO_TORCH = "python -m torch.distributed.checkpoint.format_utils dcp_to_torch"
_STEP = re.compile(r"global_step\d+")


def _names(folder: Path) -> list[str]:
    """The entries of ``folder``, sorted; empty when it cannot be listed."""
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _deepspeed_tag(folder: Path, names: list[str]) -> str | None:
    """The sub-folder of a DeepSpeed checkpoint root that holds the latest step (``latest`` names it;
    else the last ``global_stepN``), or None when ``folder`` is no such root."""
    latest = folder / "latest"
    if "latest" in names and latest.is_file():
        try:
            with open(latest, "rb") as f:  # a tag is a short name: never read a huge file whole
                tag = f.read(200).decode("utf-8", errors="replace").strip()
        except OSError:
            tag = ""
        if tag and "/" not in tag and (folder / tag).is_dir() and _holds_model_states(_names(folder / tag)):
            return tag
    steps = [n for n in names if _STEP.fullmatch(n) and (folder / n).is_dir()]
    return max(steps, key=lambda n: int(n[len("global_step"):])) if steps else None


def _holds_model_states(names: list[str]) -> bool:
    return any(n.endswith(("_model_states.pt", "_optim_states.pt")) for n in names)


def _deepspeed_step(step: Path, root: bool) -> tuple[str, str]:
    """``(what, hint)`` for a DeepSpeed checkpoint whose step folder is ``step`` (``root``: reached from the
    checkpoint root through ``latest``)."""
    names = _names(step)
    whole = [n for n in names if re.fullmatch(r"mp_rank_\d+_model_states\.pt", n)]
    zero3 = any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names)
    hint = ZERO_TO_FP32
    # ZeRO-1/2 keep every weight whole in the model-states file, unless tensor parallelism split them over
    # several such files (mp_rank_00 and mp_rank_01 each hold half of every split matrix)
    if len(whole) == 1 and not zero3:
        hint += f", or pass {step / whole[0]}, which holds the whole weights under ZeRO-1/2"
    where = f"its latest step is {step.name}/" if root else "model and optimizer states"
    return f"this is a DeepSpeed {'ZeRO-3 ' if zero3 else ''}checkpoint folder ({where}), not a model folder", hint


def describe_folder(folder: Path) -> tuple[str, str] | None:
    """``(what the folder is, what to do)`` for a distributed-training checkpoint folder, else None."""
    names = _names(folder)
    tag = _deepspeed_tag(folder, names)
    if tag is not None:
        return _deepspeed_step(folder / tag, True)
    if _holds_model_states(names):
        return _deepspeed_step(folder, False)
    if ".metadata" in names and any(n.endswith(".distcp") for n in names):
        return ("this is a torch.distributed.checkpoint (DCP) folder of sharded tensors (.distcp), not a model folder",
                f"convert it to one file: {DCP_TO_TORCH} {folder} model.pt, then pass model.pt")
    fsdp = [n for n in names if re.fullmatch(r"pytorch_model_fsdp_\d+", n) and (folder / n).is_dir()]
    if fsdp:
        return (f"this is an Accelerate FSDP sharded checkpoint ({fsdp[0]}/ holds DCP shards), not a model folder",
                f"convert it to one file: {DCP_TO_TORCH} {folder / fsdp[0]} model.pt, then pass model.pt")
    runs = sorted((n for n in names if re.fullmatch(r"checkpoint-\d+", n) and (folder / n).is_dir()), key=lambda n: int(n[11:]))
    if runs:  # a Trainer's output folder
        return (f"this is a training run's folder of checkpoints ({', '.join(runs[:3])}{' …' if len(runs) > 3 else ''}), not a model "
                "folder", f"pass one of them (e.g. {folder / runs[-1]}), or trace the run: spectra trace BASE {folder}")
    meta = _meta_shards(folder, names)
    if meta:  # Meta's own layout (llama, Mistral's reference code): consolidated.NN.pth + params.json
        if len(meta) > 1:
            return _model_parallel(folder, meta)
        return (f"this is a Meta-format checkpoint folder ({meta[0]}), not a Hugging Face model folder",
                f"pass the file: {folder / meta[0]}")
    if "pytorch_model_fsdp.bin" in names:  # Accelerate's FSDP FULL_STATE_DICT
        return ("this is an Accelerate FSDP checkpoint folder (pytorch_model_fsdp.bin), not a Hugging Face model folder",
                f"pass the file: {folder / 'pytorch_model_fsdp.bin'}")
    ckpts = sorted(n for n in names if n.endswith(".ckpt") and (folder / n).is_file())
    if ckpts:  # PyTorch Lightning's ModelCheckpoint folder
        return (f"this is a folder of training checkpoints ({', '.join(ckpts[:3])}{' …' if len(ckpts) > 3 else ''}), not a model folder",
                f"pass one of the files (e.g. {folder / ckpts[-1]}), or several in order to spectra trace")
    return None


#: One rank's file of a Meta-format checkpoint (``consolidated.00.pth``).
_META_RANK = re.compile(r"consolidated\.\d+\.pth?")


def _meta_shards(folder: Path, names: list[str]) -> list[str]:
    """The ``consolidated.NN.pth`` files of a folder, in rank order."""
    return sorted(n for n in names if _META_RANK.fullmatch(n) and (folder / n).is_file())


def _model_parallel(folder: Path, meta: list[str]) -> tuple[str, str]:
    """``(what, what to do)`` for a folder of several ``consolidated.NN.pth`` ranks ``meta``."""
    return (f"{folder} holds {len(meta)} model-parallel ranks ({meta[0]} … {meta[-1]}) of a Meta-format checkpoint: each "
            "holds a slice of every split matrix (wq, w1, … by rows; wo, w2, the embedding by columns), so one read alone "
            f"measures matrices 1/{len(meta)} of their size", "merge the ranks first (transformers' convert_llama_weights_to_hf.py "
            f"--input_dir {folder} --output_dir OUT, or your model's own converter), then pass OUT")


def model_parallel_file(path: Path) -> tuple[str, str] | None:
    """``(what, what to do)`` for one rank's ``consolidated.NN.pth`` of a model-parallel Meta-format checkpoint (the
    folder holds more than one), else None."""
    if not _META_RANK.fullmatch(path.name):
        return None
    meta = _meta_shards(path.parent, _names(path.parent))
    return _model_parallel(path.parent, meta) if len(meta) > 1 else None


#: An index file's name: ``model.safetensors.index.json``, or a variant's (``model.safetensors.index.fp16.json``).
INDEX_NAME = re.compile(r".*\.index(\.[\w-]+)?\.json")
#: One shard's file name (``model-00001-of-00004.safetensors``, a variant's ``model.fp16-00001-of-00002.safetensors``).
SHARD_NAME = re.compile(r".*-(\d+)-of-(\d+)\.(safetensors|bin)")


def lone_shard(path: Path) -> tuple[int, int] | None:
    """``(k, n)`` when ``path`` is named shard k of n > 1 (``model-0000k-of-0000n.safetensors``), else None."""
    m = SHARD_NAME.fullmatch(path.name)
    return (int(m[1]), int(m[2])) if m and int(m[2]) > 1 else None


def describe_file(path: Path) -> tuple[str, str] | None:
    """``(what the file is, what to do)`` for a file of a sharded checkpoint or a NumPy archive, else None."""
    if path.suffix == ".distcp" or path.name == ".metadata":
        return ("this is one file of a torch.distributed.checkpoint (DCP) folder, not a whole checkpoint",
                f"convert the folder to one file: {DCP_TO_TORCH} {path.parent} model.pt, then pass model.pt")
    if path.suffix == ".npz":
        return ("this is a NumPy archive (np.savez), not a checkpoint spectra reads",
                "save the arrays as safetensors (safetensors.numpy.save_file) and pass that file")
    return None
