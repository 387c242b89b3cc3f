"""Which matrices a run analyses: the ``--include``/``--exclude``/``--layers`` selection, compiled once
per run, and the expansion of tensor pairs into units (fused parts × experts), ordered so that
equally shaped units are adjacent (the engine batches them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from spectra.config import parse_layers, search_pattern
from spectra.display import as_typed, display_name
from spectra.errors import ConfigError
from spectra.naming import MatrixSpec, Part, layer_of
from spectra.pairing import MatrixPair, Skipped


@dataclass(frozen=True)
class Unit:
    """One matrix to analyse: a part of a (possibly fused, possibly expert-stacked) tensor pair."""

    order: int  # position in the final, layer-ordered results
    name: str
    expert: int | None
    rows: torch.Tensor | None
    module: str
    shape: tuple[int, int]


@dataclass
class Task:
    pair: MatrixPair
    units: list[Unit] = field(default_factory=list)


def selector(include: str | None, exclude: str | None, layers: str | None) -> Callable[[str, int | None], bool]:
    """``keep(name, layer)`` for the ``--include``/``--exclude`` regexes and the ``--layers`` selection
    (which leaves out matrices outside the layer stack). Compiled once per run.

    Raises:
        ConfigError: a regex that could backtrack catastrophically, or a name too long to match against
            it (:func:`spectra.config.search_pattern`)."""
    # guarded against catastrophic backtracking, as adapter-config patterns are (spectra.io.patterns)
    inc = search_pattern("--include", include) if include else None
    exc = search_pattern("--exclude", exclude) if exclude else None
    layer_ok = parse_layers(layers) if layers else None

    def keep(name: str, layer: int | None, *others: str) -> bool:
        """``others``: the same matrix's names on the other side (the base's, when its prefixes differ):
        ``--include`` keeps it when any name matches, ``--exclude`` drops it when any does."""
        if layer_ok is not None and (layer is None or not layer_ok(layer)):
            return False  # outside the asked layers: not analysed, not worth a skipped entry
        names = (name, *others)
        return not ((inc and not any(inc.search(n) for n in names)) or (exc and any(exc.search(n) for n in names)))

    return keep


def layer_filter(layers: str | None) -> Callable[[str], bool]:
    """Whether ``--layers`` selects a tensor that is not analysed (a norm, a bias, a shape mismatch, a tensor on one
    side only), by the layer number in its name (:func:`spectra.naming.layer_of`): a run asked for layer 0 listed every
    other layer's norms as skipped. Not ``--include``/``--exclude``: they may match a fused matrix's part names or the
    other side's spelling, which a skipped tensor's name does not show (a shape mismatch would be hidden)."""
    keep = selector(None, None, layers)
    return lambda name: keep(name, layer_of(name))


def units_of(spec: MatrixSpec, keep: Callable[..., bool], *, split_fused: bool = True,
             expert: int | None = None, other_name: str | None = None) -> list[tuple[str, torch.Tensor | None, str]]:
    """``(result name, rows, module label)`` of each part of ``spec`` that ``keep`` keeps (matched on
    its name, on the stored tensor's name for a part or an expert (``--include 'weight$'`` keeps a
    fused matrix's parts, ``--exclude 'qkv_proj\\.weight$'`` drops them all), and, when given, on
    ``other_name``: the base's name of the same tensor).

    Experts of a stacked 3-D tensor are named ``<tensor>:e<k>``, parts ``<tensor>:q`` (docs/definitions.md).
    """
    out = []
    for part in (spec.parts if split_fused else (Part(""),)):
        suffix = (f":e{expert}" if expert is not None else "") + (f":{part.suffix}" if part.suffix else "")
        name = spec.name + suffix
        others = [other_name + suffix] if other_name and other_name != spec.name else []
        if suffix:  # a part or an expert also answers to its tensor's stored name (what `spectra inspect` lists)
            others += [spec.name] + ([other_name] if other_name and other_name != spec.name else [])
        if keep(name, spec.layer, *others):
            out.append((name, part.rows, spec.module + (f":{part.suffix}" if part.suffix else "")))
    return out


def fused_whole_warning(specs: Iterable[MatrixSpec], command: str) -> str | None:
    """The warning of a command that analyses fused matrices whole (``command``: compare, trace, interfere)
    where ``spectra diff`` splits them into parts (docs/definitions.md), so that rows of the two do not
    silently disagree on "the same" module; None when no matrix in ``specs`` is fused."""
    fused = [s for s in specs if len(s.parts) > 1]
    if not fused:
        return None
    parts = ", ".join(p.suffix for p in fused[0].parts)
    count = f"{len(fused)} fused matri{'ces' if len(fused) > 1 else 'x'} (e.g. {display_name(fused[0].name)})"
    return (f"{count} analysed whole by {command}; `spectra diff` splits each into parts ({parts}), so its per-part "
            "rows do not line up with these")


def refuse_empty_selection(count: int, example: str, *, include: str | None, exclude: str | None,
                           layers: str | None, what: str = "paired matrices", one_sided: dict[str, list[str]] | None = None,
                           skipped: Sequence[Skipped] = ()) -> None:
    """Refuse a run whose ``--include``/``--exclude``/``--layers`` left none of ``count`` candidates
    (``example``: one of their names, shown so the user sees what the filters are matched against).
    Every command refuses alike: an empty table with exit code 0 reads as "nothing changed".
    ``one_sided``: what the filters left that only one input holds (compare: ``{"A": names, "B": names}``),
    said instead when there is some (the filters left matrices, none of them comparable). ``skipped``: the tensors
    the pairing left out; those the filters keep are said with why (the filter is right, its matrix was not analysed).

    Raises:
        ConfigError: when a filter was given (without one, an empty run has another cause, told by its caller).
    """
    if not count or not (include or exclude or layers):
        return
    given = ", ".join(f"--{k} {as_typed(v)}" for k, v in (("include", include), ("exclude", exclude), ("layers", layers)) if v)
    if one_sided and any(one_sided.values()):
        side, names = next((s, n) for s, n in one_sided.items() if n)
        held = ", ".join(f"{len(n)} only in {s}" for s, n in one_sided.items() if n)
        raise ConfigError(f"{given} leaves none of the {count} {what}, only matrices one input holds ({held}; e.g. {names[0]} "
                          f"in {side})", hint="widen the filter to modules both inputs update")
    keep = selector(include, exclude, layers)
    if kept := sorted((k for k in skipped if keep(k.name, layer_of(k.name))), key=lambda k: not k.name.endswith(".weight")):
        raise ConfigError(f"{given} leaves none of the {count} {what}: what it keeps was not analysed ({len(kept)} tensor"
                          f"{'s' * (len(kept) > 1)}, e.g. {kept[0].name}: {kept[0].reason})",
                          hint="run without the filter to see every skipped tensor with its reason")
    # (said of every filter alike: an --exclude that matches all of them leaves none, as an --include that matches none)
    raise ConfigError(f"no matrix is left by {given}: none of the {count} {what} passes (names look like {example})",
                      hint="`spectra inspect CHECKPOINT` lists every name; --include/--exclude are regular expressions "
                      + ("searched in each name" if what == "matrices" else "searched in the tuned and the base name"))


def unmeasured_clause(skipped: list[dict[str, str]], what: str = "compared") -> str:
    """``"; 4 matrices were not compared (e.g. X: 3-D expert stack …): the update may be in them"`` for the matrices
    a command left out (``{"name", "reason"}`` records), or ``""``: where every measured ΔW is 0, the inputs are not
    then copies of the base (a Mixtral whose only change sits in skipped expert stacks)."""
    if not skipped:
        return ""
    n, first = len(skipped), skipped[0]
    return (f"; {n} matri{'ces were' if n > 1 else 'x was'} not {what} (e.g. {first.get('name')}: {first.get('reason')}): "
            f"the update may be in {'them' if n > 1 else 'it'}")


def refuse_one_name_twice(names: Sequence[tuple[str, str]]) -> None:
    """Refuse two units reported under one name (``(unit name, stored tensor)`` pairs): a split part ``X:q`` of a fused
    ``X`` and a tensor stored under the name ``X:q``. Their records would be read back as one matrix's (a resumed run
    took the second for done and left it out: the largest update of the model, gone, exit 0).

    Raises:
        ConfigError: names both tensors and the way out.
    """
    seen: dict[str, str] = {}
    for name, tensor in names:
        if (other := seen.setdefault(name, tensor)) != tensor:
            raise ConfigError(f"two matrices would be reported as {name}: a part of {other if other != name else tensor} and the "
                              "tensor stored under that name", hint="run with --no-split (fused matrices analysed whole), or "
                              "rename the tensor")


def plan_units(pairs: list[MatrixPair], *, include: str | None = None, exclude: str | None = None,
               layers: str | None = None, split_fused: bool = True, what: str = "paired matrices",
               skipped: Sequence[Skipped] = ()) -> list[Task]:
    """Expand pairs into units (parts × experts), apply the filters, and order the work so that
    equally shaped units are adjacent (they are batched together). ``what`` names the pairs in the
    refusal of filters that leave none (``"matrices"`` for a single checkpoint), ``skipped`` the tensors the
    pairing left out (said there when the filters keep some).

    Raises:
        ConfigError: the filters leave no unit (:func:`refuse_empty_selection`), or two units have one name
            (:func:`refuse_one_name_twice`)."""
    tasks: list[Task] = []
    order = 0
    keep = selector(include, exclude, layers)
    for pair in pairs:
        spec = pair.tuned
        stacked = len(pair.tuned_info.shape) == 3
        out_dim, in_dim = pair.out_in
        task = Task(pair)
        for e in (range(pair.tuned_info.shape[0]) if stacked else [None]):
            for name, rows, module in units_of(spec, keep, split_fused=split_fused, expert=e,
                                               other_name=pair.base.name if pair.base.role == spec.role else None):
                shape = (int(rows.numel()) if rows is not None else int(out_dim), int(in_dim))
                task.units.append(Unit(order, name, e if stacked else spec.expert, rows, module, shape))
                order += 1
        if task.units:
            tasks.append(task)
    refuse_one_name_twice([(u.name, t.pair.tuned.name) for t in tasks for u in t.units])
    if pairs and not tasks:
        first = pairs[0]
        refuse_empty_selection(len(pairs), first.tuned.name + (f" (base: {first.base.name})" if first.base.name != first.tuned.name
                                                                 else ""), include=include, exclude=exclude, layers=layers,
                               what=what, skipped=skipped)
    tasks.sort(key=lambda t: (t.units[0].shape, t.units[0].order))
    return tasks
