"""Options of spectra's runs: one dataclass per command, sharing one block of selection and device
fields (:class:`SharedOptions`) and their validation. Configs are saved with the results; every field
is validated in ``__post_init__`` with a :class:`~spectra.errors.ConfigError` that echoes the bad value.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

import numpy as np
import torch

from spectra.display import as_typed
from spectra.errors import ConfigError
from spectra.io.patterns import MAX_CHOICES, MAX_NAME_CHARS, MAX_PATTERN_CHARS, MAX_UNBOUNDED, choice_points, pattern_risk
from spectra.linalg import validate_device
from spectra.metrics import DEFAULT_THRESHOLDS
from spectra.subspaces import DEFAULT_EPSILONS
from spectra.training_inputs import check_seed

_R = TypeVar("_R")
_P = ParamSpec("_P")
_C = TypeVar("_C")


@dataclass(frozen=True)
class SharedOptions:
    """Options every command has: which matrices it analyses and where. One definition and one
    validation, inherited by :class:`DiffConfig`, :class:`CompareConfig` and the other commands' configs.

    Attributes:
        include: regex; only matrices whose result name matches (``re.search``) are analysed.
        exclude: regex; matrices whose result name matches are left out (and listed as skipped).
        layers: layer selection such as ``"0-3,7,10-"``; matrices outside the layer stack
            (embeddings, head) are left out when set.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    include: str | None = None
    exclude: str | None = None
    layers: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):  # the Python API's own device type, recorded as its name
            object.__setattr__(self, "device", str(self.device))
        check_field_types(self)
        if "seed" in self.__dataclass_fields__:  # every command's seed: 2**70 failed in torch ("Overflow when unpacking long long")
            check_seed(self.seed)  # type: ignore[attr-defined]
        validate_filters(self.include, self.exclude)
        if self.layers is not None:
            parse_layers(self.layers)
        validate_device(self.device)


@dataclass(frozen=True)
class DiffConfig(SharedOptions):
    """Options of a diff run; saved with the results.

    Attributes:
        thresholds: energy-rank thresholds τ (each in (0, 1]); docs/definitions.md's defaults 0.5, 0.9, 0.99.
        include, exclude, layers, device: see :class:`SharedOptions`.
        top_k: how many of the largest singular values each result keeps (plots, JSON); the metrics
            always use the full spectrum.
        method: ``"gram"`` (eigenvalues of the smaller Gram matrix; fast) or ``"svd"``
            (``torch.linalg.svdvals``); both exact, see :mod:`spectra.linalg`.
        precision: dtype of the decomposition. ``"float64"`` (default) keeps every singular value
            down to ~1e-7·σ₁; ``"float32"`` solves in float32 and keeps a matrix's spectrum only where
            :func:`spectra.linalg.certify_float32` proves its energy ranks equal float64's, else solves it
            again in float64 (``method`` names what solved each matrix); the other metrics of a certified
            matrix are float32's (small singular values lost: nuclear norm, effective rank).
        split_fused: split fused matrices (``qkv_proj``, ``c_attn``, ``query_key_value``,
            ``gate_up_proj``) into their logical parts (docs/definitions.md); False analyses them whole.
        approx: estimate energy ranks from a randomized sketch instead of the exact spectrum; each
            estimate comes with guaranteed bounds (``energy_rank_bounds``), see
            :func:`spectra.sketch.approx_energy_ranks`.
        approx_above: use the approximate mode automatically for matrices with ``p = min(out, in)``
            above this; None never does. The default, 16384, keeps every matrix of today's open
            models up to 405B exact (their largest p is 16384) and stops the exact path's p³ cost
            (and its 8·p² byte Gram) from taking over beyond that (``docs/scale.md``).
        approx_tol: approximate mode stops when every bound is narrower than this fraction of p.
        seed: seed of the random sketches (approximate mode), so reruns give the same numbers.
        max_batch: most matrices decomposed together (equal shapes only).
        max_batch_bytes: memory cap of a batch; default 45% of the free CUDA memory (a quarter more goes to
            reading ahead, see ``prefetch_bytes``), or 16 MiB on the CPU (where the engine solves a batch
            one matrix per worker thread: larger batches only delay reading the next one).
        prefetch: tensor pairs read ahead while the engine works (0: none); default ``max_batch`` on the
            CPU (read by one thread beside the engine's workers) and 8 on CUDA.
        prefetch_bytes: most bytes of tensor pairs in flight (stored tensors and their ΔW); default a
            quarter of the free CUDA memory on a GPU (ΔW is formed there), three times
            ``max_batch_bytes`` on the CPU. One pair is always read, however large.
        weight_spectra: also keep the top singular values of W_base and W_tuned (two more exact
            decompositions per matrix), for spectra plots of the weights next to ΔW (Biderman et al.
            Fig. S7).
        read_workers: reader threads; default 1 on the CPU and up to 4 on CUDA, where reading and
            forming ΔW, not the GPU, is the bottleneck (``bench/results/``).
        esd: also fit WeightWatcher's heavy-tailed metrics (:func:`spectra.esd.esd_metrics`: α, D, xmin,
            σ_α, α-hat, norms, Marchenko–Pastur fit; λ = σ², WeightWatcher's default xmin fit) to the full
            spectra of W_base, W_tuned and ΔW of each matrix, into each result's ``esd`` entry. Implies
            ``weight_spectra`` (the spectra of W_base and W_tuned are needed), so it costs the same two extra
            decompositions per matrix plus the fits. Not available in the approximate mode (the fit needs every
            eigenvalue; the entry says so) nor for a ΔW with fewer than
            :data:`spectra.records.MIN_DELTA_FIT_RANK` eigenvalues a fit keeps that is not full rank (a LoRA
            update, factored or merged; W_base and W_tuned are still fitted when the base is given).
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    top_k: int = 64
    method: Literal["gram", "svd"] = "gram"
    precision: Literal["float64", "float32"] = "float64"
    split_fused: bool = True
    approx: bool = False
    approx_above: int | None = 16384
    approx_tol: float = 0.01
    seed: int = 0
    max_batch: int = 32
    max_batch_bytes: int | None = None
    prefetch: int | None = None
    prefetch_bytes: int | None = None
    read_workers: int | None = None
    weight_spectra: bool = False
    esd: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.esd and not self.weight_spectra:  # the fits of W_base and W_tuned need their spectra
            object.__setattr__(self, "weight_spectra", True)
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0. Got {self.top_k} instead")
        if self.method not in ("gram", "svd"):
            raise ConfigError(f"method must be 'gram' or 'svd'. Got {self.method!r} instead")
        if self.precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32'. Got {self.precision!r} instead")
        if self.approx and self.method != "gram":  # every matrix is sketched: the method was recorded, never used
            raise ConfigError(f"method {self.method!r} does not apply with approx (every matrix is sketched)",
                              hint="drop --method svd (the approximate mode sketches every matrix), or drop --approx for exact spectra")
        if self.approx and self.precision != "float64":  # likewise: recorded, never used (and the run took twice as long)
            raise ConfigError(f"precision {self.precision!r} does not apply with approx (every matrix is sketched, in float32, "
                              "with bounds)", hint="drop --precision (or --approx for exact spectra)")
        if not 0 < self.approx_tol < 1:
            raise ConfigError(f"approx_tol must be in (0, 1). Got {self.approx_tol} instead")
        if self.prefetch_bytes is not None and self.prefetch_bytes < 1:
            raise ConfigError(f"prefetch_bytes must be >= 1. Got {self.prefetch_bytes} instead")
        if self.max_batch < 1 or (self.prefetch is not None and self.prefetch < 0):
            raise ConfigError(f"max_batch must be >= 1 and prefetch >= 0. Got {self.max_batch}, {self.prefetch} instead")
        for name in ("read_workers", "max_batch_bytes", "approx_above"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or None). Got {getattr(self, name)} instead")


@dataclass(frozen=True)
class CompareConfig(SharedOptions):
    """Options of a compare run; saved with the results.

    Attributes:
        side: singular vectors compared: ``"right"`` (input space; Hu et al. used the right singular
            vectors of the LoRA ``A`` matrices), ``"left"`` or ``"both"``.
        top_k: rank of the subspace taken from a full (non-LoRA) update.
        intruder_k: top singular vectors of the tuned weight checked for intruders (default 10).
        epsilon: intruder threshold; ``epsilons`` the sweep.
        include, exclude, layers, device: see :class:`SharedOptions` (matched on the base tensor names).
        seed: seed of random references (random projections of the amplification table).
    """

    side: Literal["left", "right", "both"] = "right"
    top_k: int = 64
    intruder_k: int = 10
    epsilon: float = 0.5
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.side not in ("left", "right", "both"):
            raise ConfigError(f"side must be left, right or both. Got {self.side!r} instead")
        if self.top_k < 1 or self.intruder_k < 1:
            raise ConfigError(f"top_k and intruder_k must be >= 1. Got {self.top_k}, {self.intruder_k} instead")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1). Got {self.epsilon} instead")
        if not self.epsilons or not all(0 < e < 1 for e in self.epsilons):
            raise ConfigError(f"epsilons must each be in (0, 1). Got {list(self.epsilons)} instead")
        # sorted, each once, as thresholds are: a repeated ε folded two entries into one key of the per-module counts
        object.__setattr__(self, "epsilons", tuple(sorted(set(self.epsilons))))


def config_of(config: object, cls: type[_C]) -> _C:
    """``config``, or ``cls()`` for None, at a command's entry point; ConfigError for anything else (a dict, or another
    command's config, failed with an AttributeError deep in the run; an empty dict was taken for the defaults)."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__} (got {type(config).__name__})",
                          hint=f"pass a {cls.__module__}.{cls.__name__}(...), or None for the defaults")
    return config


def check_field_types(cfg: object) -> None:
    """ConfigError naming the first field of the dataclass ``cfg`` whose value does not fit its annotation
    (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]``; each config checks its
    ``Literal`` choices itself): a ``top_k`` of
    2.5 or a ``split_fused`` of ``"no"`` (truthy) must not run. Annotations it cannot judge pass. A value
    that fits is stored as the plain Python type (:func:`_plain`): ``np.int64(5)`` as 5."""
    try:
        hints = typing.get_type_hints(type(cfg))
    except (NameError, TypeError):  # an annotation that does not resolve at run time: nothing to judge by
        return
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value, hint = getattr(cfg, f.name), hints.get(f.name)
        if hint is not None and not _fits(value, hint):
            raise ConfigError(f"{f.name} must be {_describe(hint)}. Got {value!r} instead")
        if hint is not None:
            # numpy scalars and whole floats fit, but slices, seeds and JSON want plain ints, floats and bools
            plain = _plain(value, hint)
            if plain is not value:
                object.__setattr__(cfg, f.name, plain)  # (frozen dataclasses too)


def _plain(value: object, hint: object) -> object:
    """``value`` (which fits ``hint``) as the plain Python type ``hint`` names: ``np.int64(5)`` or ``5.0``
    for an int -> 5, ``np.bool_`` -> bool, ``np.str_`` -> str, a list for a tuple -> tuple; a float32 keeps
    its shortest decimal (``np.float32(0.9)`` -> 0.9, not 0.8999999761581421: a τ names a column)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        fit = next((a for a in args if _fits(value, a)), None)
        return value if fit is None else _plain(value, fit)
    if origin is tuple and isinstance(value, (tuple, list)):
        items = [_plain(v, args[0] if len(args) == 2 and args[1] is Ellipsis else (args[i] if i < len(args) else object))
                 for i, v in enumerate(value)]
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value)) else tuple(items)
    if hint is bool and not isinstance(value, bool):
        return bool(value)
    if hint is int and type(value) is not int:
        return int(value)  # type: ignore[call-overload]
    if hint is float and type(value) is not float:
        if isinstance(value, np.floating) and np.finfo(value.dtype).bits < 64:
            return float(str(value))
        return float(value)  # type: ignore[arg-type]
    if hint is str and type(value) is not str:
        return str(value)
    return value


def _fits(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:  # each config names its choices in its own words (CLI options), after this check
        return True
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args)))
    if hint is type(None):
        return value is None
    if hint is bool:  # numpy's bools and 0/1 are fine; a string ("no" is truthy) is not
        return isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))
    if hint is int:  # a whole float (max_batch_bytes=2e9) is a count too
        return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
            isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer())
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a tuple or list, each item {_describe(args[0])}" if args else "a tuple or list"  # ("a tuple of a number")
    names = {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))  # type: ignore[call-overload]


#: Worst-case matching steps allowed for one name against an ``--include``/``--exclude`` pattern: a pattern
#: with u unbounded repetitions (the search's scan over start positions counted as one) takes up to about
#: ``L**u`` steps on a name of L characters, so names are matched up to ``FILTER_STEPS**(1/u)`` characters
#: (256 for u = 3, the most :func:`spectra.io.patterns.pattern_risk` accepts; 0.05 s at worst).
FILTER_STEPS = MAX_NAME_CHARS**3


@dataclass(frozen=True)
class SearchPattern:
    """A checked ``--include``/``--exclude``/``--plot-include`` regex, searched (``re.search``) in names
    without catastrophic backtracking: the same guard as adapter-config patterns (:mod:`spectra.io.patterns`).

    Attributes:
        option: the option it came from, for messages (``"--include"``).
        pattern: the regex as given; ``rx`` compiled.
        max_name: longest name it is matched against (:data:`FILTER_STEPS`).
    """

    option: str
    pattern: str
    rx: re.Pattern
    max_name: int

    def search(self, name: str) -> bool:
        """``re.search(pattern, name) is not None``.

        Raises:
            ConfigError: ``name`` is longer than :attr:`max_name` (a hostile tensor name could make the
                match run for hours).
        """
        if len(name) > self.max_name:
            raise ConfigError(f"tensor name {name[:60]!r}… has {len(name)} characters; {self.option} {self.pattern[:80]!r} "
                              f"has repetitions and is matched against names up to {self.max_name} characters",
                              hint=f"give {self.option} a pattern with fewer repetitions (*, +, {{m,}}), e.g. a literal part "
                                   "of the names")
        return self.rx.search(name) is not None


def search_pattern(option: str, pattern: str) -> SearchPattern:
    r"""Check and compile one name filter (``option`` such as ``"--include"``, for messages).

    A search is the pattern preceded by an implicit scan over start positions, which counts as one
    unbounded repetition (:func:`spectra.io.patterns.pattern_risk`): nested repetition such as
    ``(a+)+b``, backreferences and more than two unbounded repetitions of its own are refused.

    >>> search_pattern("--include", r"layers\.\d+").max_name
    4096
    >>> search_pattern("--include", "q_proj").search("model.layers.0.self_attn.q_proj.weight")
    True

    Raises:
        ConfigError: not a valid regex, longer than 512 characters, or a pattern that could backtrack
            catastrophically; one line echoing the pattern.
    """
    try:
        rx = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{option} must be a valid regular expression. Got {as_typed(pattern)} instead ({exc})") from None
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{option} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are matched",
                          hint="name the matrices with a shorter pattern")
    reason, unbounded = pattern_risk(pattern)
    unbounded += 1  # the search's scan over start positions: as a leading ".*" (not prefixed: "(?i)" must lead)
    if reason is None and unbounded > MAX_UNBOUNDED:
        reason = (f"has {unbounded - 1} unbounded repetitions where at most {MAX_UNBOUNDED - 1} are searched (each one "
                  "multiplies the matching time by the name's length)")
    if reason is None and (choices := choice_points(pattern)) > MAX_CHOICES:
        reason = (f"has {choices} alternatives and optional parts where at most {MAX_CHOICES} are searched (written out, "
                  "as in '(?:.|.)(?:.|.)…', their combinations take exponential time)")
    if reason:
        raise ConfigError(f"{option} {pattern[:80]!r} {reason}",
                          hint=f"{option} is searched anywhere in the name, so a leading or trailing '.*' is not needed; "
                               "write it with fewer repetitions and no repeated group (e.g. '(a+)+b' as 'a+b')")
    return SearchPattern(option, pattern, rx, int(FILTER_STEPS ** (1.0 / unbounded) + 1e-9))


def validate_filters(include: str | None, exclude: str | None) -> None:
    """Raise :class:`ConfigError` unless both are None or name filters :func:`search_pattern` accepts."""
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            search_pattern(f"--{name}", pattern)


def check_thresholds(thresholds: tuple[float, ...]) -> tuple[float, ...]:
    """The energy thresholds τ (``--threshold``/``-t``), sorted and each once.

    Raises:
        ConfigError: none given, or one outside (0, 1] (a value below 5e-324, as typed, reads as 0).
    """
    bad = [t for t in thresholds if not 0.0 < float(t) <= 1.0]
    if not thresholds or bad:
        zero = " (0, or a value below 5e-324, the smallest float, which reads as 0)"
        shown = ", ".join(repr(float(t)) + (zero if float(t) == 0 else "") for t in bad)
        raise ConfigError(f"thresholds must each be in (0, 1] (--threshold/-t). Got {shown or 'none'} instead",
                          hint="τ is the share of ‖ΔW‖² to hold, e.g. 0.9")
    return tuple(sorted({float(t) for t in thresholds}))


#: Keyword arguments the public entry points share, checked before any work (:func:`public_entry`).
_FLAGS = ("plots", "resume", "allow_identical")


def _checked_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call to a public entry point with its shared arguments checked: ``out_dir`` a path
    (``~`` expanded, as the inputs are: ``"~/x"`` made a folder named ``~`` in the working directory), ``callback``
    callable, the flags True or False (``plots="no"`` drew the figures). A call that does not bind is passed on as
    it is, for Python's own error."""
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return args, kwargs
    got = bound.arguments
    out = got.get("out_dir")
    if out is not None:
        if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
            raise ConfigError(f"out_dir must be a folder path (a str or os.PathLike). Got {type(out).__name__} {out!r:.60} instead")
        if os.fspath(out).startswith("~"):
            got["out_dir"] = os.path.expanduser(os.fspath(out))
    if (cb := got.get("callback")) is not None and not callable(cb):
        raise ConfigError(f"callback must be a function or None. Got {type(cb).__name__} {cb!r:.60} instead")
    for flag in _FLAGS:
        if flag in got and not isinstance(got[flag], (bool, np.bool_)):
            raise ConfigError(f"{flag} must be True or False. Got {type(got[flag]).__name__} {got[flag]!r:.60} instead")
    return bound.args, bound.kwargs


def public_entry(entry: Callable[_P, _R]) -> Callable[_P, _R]:
    """``entry`` (a public entry point) with its shared arguments checked (:func:`_checked_arguments`) and run
    with torch's default device the CPU, whatever the caller set: spectra makes its own tensors where it means them
    (``device=`` from its options) and takes an unplaced one to be on the CPU, so a notebook's
    ``torch.set_default_device("meta")`` failed every command with "Cannot copy out of meta tensor" (and "cuda"
    would have moved its scratch there). The setting is per thread; the CPU default is entered only where another
    one is set (a device context costs a Python call per torch operation)."""
    sig = inspect.signature(entry)

    @functools.wraps(entry)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        args, kwargs = _checked_arguments(sig, args, kwargs)
        current = getattr(torch, "get_default_device", lambda: torch.device("cpu"))()
        if current.type == "cpu":
            return entry(*args, **kwargs)
        with torch.device("cpu"):
            return entry(*args, **kwargs)
    return run


def parse_layers(spec: str) -> Callable[[int], bool]:
    """Parse ``"0-3,7,10-"`` into a predicate on layer indices.

    >>> pred = parse_layers("0-1,5,8-")
    >>> [i for i in range(10) if pred(i)]
    [0, 1, 5, 8, 9]
    """
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]*))?", part)  # ASCII digits: "١" is no layer number
        if not m:
            raise ConfigError(f"--layers must look like '0-3,7,10-'. Got {as_typed(spec)} instead")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else (int(m.group(2)) if m.group(2) else None)
        if hi is not None and hi < lo:
            raise ConfigError(f"--layers range {as_typed(part)} is empty (end before start)")
        ranges.append((lo, hi))
    # single layers in a set, ranges merged and bisected: a list of 10,000 layers costs O(log n) per test
    singles = frozenset(lo for lo, hi in ranges if hi == lo)
    spans = sorted((lo, math.inf if hi is None else hi) for lo, hi in ranges if hi != lo)
    merged: list[list[float]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    starts = [lo for lo, _ in merged]

    def keep(i: int) -> bool:
        if i in singles:
            return True
        j = bisect.bisect_right(starts, i) - 1
        return j >= 0 and i <= merged[j][1]
    return keep
