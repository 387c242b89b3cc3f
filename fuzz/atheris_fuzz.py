"""Coverage-guided fuzzing of the untrusted-input parsers with atheris (libFuzzer).

Complements the property tests of ``tests/test_fuzz.py`` (hypothesis, run by ``make test``): here
libFuzzer mutates bytes towards new code paths in spectra's own parsers. Every input must end in a
result or a :class:`spectra.errors.SpectraError`; any other exception, and any read of the decoy
file outside the checkpoint folder, is a crash that libFuzzer reports with the input that caused it.

    pip install -e '.[fuzz]'
    python fuzz/atheris_fuzz.py safetensors -runs=20000     # raw bytes as a .safetensors file
    python fuzz/atheris_fuzz.py index -runs=20000           # bytes as model.safetensors.index.json
    python fuzz/atheris_fuzz.py adapter -runs=20000         # bytes as adapter_config.json
    python fuzz/atheris_fuzz.py config -runs=20000          # bytes as config.json beside a real shard
    python fuzz/atheris_fuzz.py pickle -runs=20000          # bytes as a .bin (torch.load, weights_only)
    make fuzz                                                # all five, bounded

The model folder holds a symlink ``r -> <work dir>``, so an index naming ``r/secret.safetensors``
reaches the decoy unless spectra's path containment refuses it first.

Not part of ``make test`` (atheris is an optional extra and the runs take minutes).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["spectra"]):
    from spectra.errors import SpectraError
    from spectra.io.adapter import open_adapter
    from spectra.io.checkpoint import open_checkpoint

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="spectra-atheris-"))
DECOY = WORK / "secret.safetensors"  # outside every checkpoint folder: must never be opened
FOLDER = WORK / "model"
FOLDER.mkdir()
save_file({"w": torch.zeros(2, 2)}, str(DECOY))
save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)}, str(FOLDER / "shard.safetensors"))
os.symlink(WORK, FOLDER / "r")  # a way out of the folder that only path containment closes
CONFIG_FOLDER = WORK / "configured"
CONFIG_FOLDER.mkdir()
save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(CONFIG_FOLDER / "model.safetensors"))
ADAPTER = WORK / "adapter"
ADAPTER.mkdir()
save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2)},
          str(ADAPTER / "adapter_model.safetensors"))
_real_open, _real_os_open = open, os.open
_DECOY = os.path.realpath(DECOY)


def _guard(file) -> None:
    if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == _DECOY:
        raise AssertionError(f"read outside the checkpoint folder: {file}")  # a crash for libFuzzer


def _guard_open(file, *args, **kwargs):
    _guard(file)
    return _real_open(file, *args, **kwargs)


def _guard_os_open(path, *args, **kwargs):
    _guard(path)
    return _real_os_open(path, *args, **kwargs)


def _read_all(path: Path) -> None:
    ckpt = open_checkpoint(path)
    for name in ckpt.tensors:
        ckpt.load(name)


def one_safetensors(data: bytes) -> None:
    path = WORK / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        _read_all(path)
    except SpectraError:
        pass


def one_index(data: bytes) -> None:
    (FOLDER / "model.safetensors.index.json").write_bytes(data)
    try:
        _read_all(FOLDER)
    except SpectraError:
        pass


def one_adapter(data: bytes) -> None:
    (ADAPTER / "adapter_config.json").write_bytes(data)
    try:
        adapter = open_adapter(ADAPTER)
        for module in adapter.modules.values():
            module.factors()
    except SpectraError:
        pass


def one_config(data: bytes) -> None:
    (CONFIG_FOLDER / "config.json").write_bytes(data)
    try:
        ckpt = open_checkpoint(CONFIG_FOLDER)
        ckpt.arch  # noqa: B018 - head counts and layout are read from the config
    except SpectraError:
        pass


def one_pickle(data: bytes) -> None:
    path = WORK / "fuzz.bin"
    path.write_bytes(data)
    try:
        _read_all(path)
    except SpectraError:
        pass


TARGETS = {"safetensors": one_safetensors, "index": one_index, "adapter": one_adapter, "config": one_config,
           "pickle": one_pickle}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options such as -runs=N]")
    target = TARGETS[sys.argv.pop(1)]
    import builtins
    import io

    # every way spectra opens files: open()/Path.open (io.open) for headers and JSON, os.open for data
    builtins.open = io.open = _guard_open
    os.open = _guard_os_open
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
