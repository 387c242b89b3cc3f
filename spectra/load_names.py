"""The names transformers ≥ 5 gives a checkpoint's modules when it loads them, and whether the model it built from
``config.json`` holds the stored weights (:func:`refuse_partial_load`).

transformers 5 renames some stored keys on load (``conversion_mapping``'s ``WeightRenaming`` rules for the
model and each of its sub-models, and a ``base_model_prefix`` added or stripped): GPT-NeoX's ``embed_out``
becomes ``lm_head``; LLaVA's ``language_model.model.layers…`` and Qwen2-VL's ``model.layers…`` move under
``model.language_model``, their vision towers under ``model.…``. PEFT matches an adapter's keys and
``target_modules`` against the loaded model's names, so an adapter written with the stored names loads
with those modules missing (PEFT warns and leaves their LoRA at zero): the whole adapter, for Qwen2-VL.

:func:`load_renames` asks the installed transformers, as its loader does: the model of ``config.json``'s
first ``architectures`` entry is built on the meta device (no memory, no weights read), and each key goes
through ``get_model_conversion_mapping`` and ``rename_source_key``. Without transformers, or for a model it
cannot build (custom code), nothing is renamed: the stored names are what a transformers < 5 loads. Keys that
a ``WeightConverter`` fuses (per-expert MoE weights) are left to :mod:`spectra.peft_moe`: PEFT converts those
adapters itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError


def _loaded_model(config: Mapping[str, Any] | None) -> tuple[Any, Any, list, list, dict, str | None] | None:
    """``(transformers, model on the meta device, renamings, converters, its state dict, base_model_prefix)``
    for ``config.json``'s first ``architectures`` entry as the installed transformers builds it, or None (no
    transformers, another API, a model it cannot build, a config naming no class)."""
    archs = (config or {}).get("architectures") or []
    model_type = (config or {}).get("model_type")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str) and isinstance(model_type, str)):
        return None  # a hand-written config.json ("architectures": 5) names no class to ask
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        quiet = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # a tiny config's token-id complaints are not the user's business here
        try:
            # never a download: a DETR-style config would fetch its pretrained backbone when built
            cfg = transformers.AutoConfig.for_model(model_type, **{**{k: v for k, v in config.items() if k != "model_type"},
                                                                   "use_pretrained_backbone": False})
            with torch.device("meta"):
                model = getattr(transformers, archs[0])(cfg)
        finally:
            transformers.logging.set_verbosity(quiet)
        mapping = get_model_conversion_mapping(model)
        renamings = [e for e in mapping if isinstance(e, WeightRenaming)]
        converters = [e for e in mapping if isinstance(e, WeightConverter)]
        return transformers, model, renamings, converters, model.state_dict(), getattr(model, "base_model_prefix", None) or None
    except Exception:  # noqa: BLE001 - no transformers, another API, a model it cannot build: names as stored
        return None


def _loaded_key(key: str, built: tuple[Any, Any, list, list, dict, str | None]) -> tuple[str, Any]:
    """``(the name transformers loads a stored key under, the converter that fuses it or None)``."""
    from transformers.core_model_loading import rename_source_key

    _, _, renamings, converters, own, prefix = built
    new, fused = rename_source_key(key, renamings, converters, prefix, own)
    if new not in own and key in own:  # transformers' own fallback: no rename, only the prefix
        new, fused = rename_source_key(key, [], [], prefix, own)
    return new, fused


def _load_map(built: tuple[Any, Any, list, list, dict, str | None], keys: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({stored key: loaded name}, {stored key: the first loaded name it is split into})``: the keys ``built``'s
    transformers renames (not fuses) to one of its own parameters, and the keys a converter splits on load into other
    weights (Param2-MoE's ``attention.query_key_value.weight`` into ``self_attn.q_proj.weight``, …). One rename per key."""
    own = built[4]
    renamed: dict[str, str] = {}
    split: dict[str, str] = {}
    for key in keys:
        try:
            new, fused = _loaded_key(key, built)
        except Exception:  # noqa: BLE001 - a rule this key breaks: the stored name
            continue
        if new == key or new not in own:
            continue
        if fused is None:
            renamed[key] = new
        elif new.endswith(".weight") and key.endswith(".weight"):
            split[key] = new
    return renamed, split


def loaded_keys(config: Mapping[str, Any] | None, keys: Iterable[str]) -> dict[str, str]:
    """``{stored key: its name in the loaded model}`` for the tensors transformers renames (not fuses) on load
    (GraniteMoE's ``block_sparse_moe.input_linear.weight`` -> ``block_sparse_moe.experts.gate_up_proj``, Mixtral's
    ``block_sparse_moe.gate.weight`` -> ``mlp.gate.weight``); empty without transformers or for a model it cannot
    build. The names a PEFT adapter saved from a transformers >= 5 model uses."""
    built = _loaded_model(config)
    return {} if built is None else _load_map(built, keys)[0]


def load_renames(config: Mapping[str, Any] | None, modules: Iterable[str]) -> tuple[dict[str, str], str | None]:
    """``{module path: its path in the loaded model}`` for the modules transformers renames on load,
    and a phrase saying where that came from (None when nothing is renamed).

    Args:
        config: the base model's ``config.json`` (``architectures``, ``model_type``…), or None.
        modules: module paths as stored (``embed_out``, ``model.layers.0.self_attn.q_proj``).

    A module ``m`` goes where its weight ``m.weight`` goes; a renamed weight that is not one of the
    model's own parameters (transformers would not load it there either) leaves ``m`` as stored.
    """
    return adapter_renames(config, modules)[:2]



def adapter_renames(config: Mapping[str, Any] | None, modules: Iterable[str],
                    params: Iterable[str] = ()) -> tuple[dict[str, str], str | None, dict[str, str], dict[str, str]]:
    """:func:`load_renames` of ``modules``, :func:`loaded_keys` of ``params`` (the parameters of a
    ``target_parameters`` LoRA, which PEFT names as loaded too) and ``{module: the first module its weight is split
    into}`` for the ``modules`` transformers splits on load (:func:`refuse_split`), from one meta-device model."""
    built = _loaded_model(config)
    if built is None:
        return {}, None, {}, {}
    transformers, model = built[:2]
    renamed, split = _load_map(built, (f"{m}.weight" for m in modules))
    out = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in renamed.items() if v.endswith(".weight")}
    # the modules a converter splits on load: no module of the stored name exists once loaded, so PEFT skips a LoRA
    # on it without a word (stacked experts, a converter into a bare parameter, are spectra.peft_moe's: not listed)
    return (out, (f"transformers {transformers.__version__} loads {type(model).__name__} with these modules renamed" if out else None),
            _load_map(built, params)[0], {k[: -len(".weight")]: v[: -len(".weight")] for k, v in split.items()})


def refuse_split(split: Mapping[str, str], modules: Iterable[str], what: str, path: Any, rerun: str) -> None:
    """Raise :class:`~spectra.errors.ConfigError` when ``what`` (an adapter, a LoraConfig) would adapt one of ``modules``
    that transformers splits on load (``split``: :func:`adapter_renames`' last map); ``rerun``: the command its hint names."""
    if chosen := {m: split[m] for m in modules if m in split}:
        first = next(iter(chosen))
        raise ConfigError(f"{what} would adapt {len(chosen)} module{'s' * (len(chosen) != 1)} (e.g. {first}) that transformers "
                          f"splits on load into others ({first} becomes {chosen[first]}, …): PEFT would skip "
                          f"{'their' if len(chosen) != 1 else 'its'} LoRA without a word, and the energy said kept would not be",
                          path=path, hint=f"rerun {rerun} with --exclude '{first.rpartition('.')[2]}'")


#: What WeightWatcher 0.7.7 calls a layer it analyses (``PyTorchLayer.layer_type``): the lowercased
#: ``str(type(module))`` holding one of these words (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``…).
WW_LAYER_WORDS = ("linear", "conv1d", "conv2d", "embedding")


def _ww_layer(module: Any) -> bool:
    return any(w in str(type(module)).lower() for w in WW_LAYER_WORDS)


def ww_unseen(config: Mapping[str, Any] | None, keys: Iterable[str]) -> dict[str, str] | None:
    """``{stored key: why WeightWatcher does not see it}`` for the keys whose loaded parameter is not the
    ``weight`` of a module WeightWatcher analyses, in the model the installed transformers builds from
    ``config.json`` (transformers ≥ 5 loads per-expert MoE weights into one stacked parameter of an
    ``…Experts`` module, and builds Mixtral's and Qwen2-MoE's routers as ``…TopKRouter`` modules, neither a
    Linear); or None when that model cannot be built (the caller keeps its name rules). A key the model does
    not hold (a tied head, a key of another model) is not judged."""
    built = _loaded_model(config)
    if built is None:
        return None
    transformers, model, *_, own, _ = built
    version = f"transformers {transformers.__version__}"
    out: dict[str, str] = {}
    for key in keys:
        try:
            new, fused = _loaded_key(key, built)
        except Exception:  # noqa: BLE001 - a rule this key breaks: not judged
            continue
        # a converter that stacks experts loads the key into a bare parameter (…experts.gate_up_proj); one
        # that chunks a fused Wqkv into Linear q/k/v (nomic-bert, GTE) or only transposes does not hide it
        module = None
        if new in own and new.endswith(".weight"):
            with contextlib.suppress(AttributeError):
                module = model.get_submodule(new[: -len(".weight")])
        if fused is not None and (module is None or not _ww_layer(module)):
            out[key] = f"{version} loads it into a stacked parameter ({new}): WeightWatcher does not see it (--ww-compatible)"
        elif module is not None and not _ww_layer(module):
            path = new[: -len(".weight")]
            out[key] = (f"{version} builds {path} as {type(module).__name__}, not a Linear, Conv or Embedding: "
                        "WeightWatcher does not see it (--ww-compatible)")
    return out


def renames_text(renames: Mapping[str, str], source: str | None, what: str) -> str:
    """One line for a warning or note: where the renames come from, that ``what`` names the modules as
    loaded, how many, and one example.

    >>> renames_text({"embed_out": "lm_head"}, "transformers renames them", "the adapter")
    'transformers renames them: the adapter names them as loaded, as PEFT matches them (1 renamed, e.g. embed_out → lm_head)'
    """
    old, new = next(iter(renames.items()))
    return f"{source}: {what} names them as loaded, as PEFT matches them ({len(renames)} renamed, e.g. {old} → {new})"


def refuse_partial_load(base: str | Path, info: dict) -> None:
    """Refuse a model transformers built from ``config.json`` that is not the stored one (``info``: its loading info): weights
    the checkpoint lacks (initialised at random, then trained and saved as if they were the base's), stored weights the
    model has no place for (dropped: a model of fewer layers), or shapes the config contradicts.

    Raises:
        ConfigError: names the first of each kind, with counts.
    """
    said = []
    for key, what in (("missing_keys", "weights the checkpoint does not hold (transformers would initialise them at random)"),
                      ("unexpected_keys", "stored weights the model has no place for (they would be dropped)")):
        if names := sorted(info.get(key) or ()):
            said.append(f"{len(names)} {what}, e.g. {names[0]}")
    if shapes := sorted(info.get("mismatched_keys") or (), key=lambda x: str(x[0])):
        name, stored, built = shapes[0]
        said.append(f"{len(shapes)} weights of another shape than stored, e.g. {name} stored {tuple(stored)}, "
                    f"built {tuple(built)}")
    if said:
        raise ConfigError(f"config.json does not describe the weights stored beside it: {'; '.join(said)}", path=base,
                          hint="fix config.json (num_hidden_layers, vocab_size, hidden_size…) to the checkpoint, or use the "
                               "folder save_pretrained wrote")


__all__ = ["adapter_renames", "loaded_keys", "load_renames", "refuse_partial_load", "refuse_split", "renames_text"]
