"""Checks of a ``spectra.diff/1`` results document (``results.json``, and the journal records a
resumed run takes in): every key of the type the results and the report read, and no value a ΔW
cannot have (a negative norm, a rank above min(out, in), ranks that fall as τ rises). A file that
fails is refused with one line naming the file, the record and the field, never shown as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from spectra.errors import ResultsFormatError
from spectra.io.safetensors_file import MAX_DIM
from spectra.metrics import threshold_key

SCHEMA = "spectra.diff/1"

#: Layer and expert indices are parsed from tensor names of at most 18 digits (:mod:`spectra.naming`).
MAX_INDEX = 10**18


def is_axis(v: Any) -> bool:
    """Whether ``v`` is a matrix dimension spectra can have read: a whole number in ``[1, MAX_DIM]`` (2^31)."""
    return is_int(v) and 1 <= v <= MAX_DIM


def _type(x: Any) -> str:
    return "null" if x is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(x), type(x).__name__)


def is_num(x: Any) -> bool:
    """Whether a JSON value is a number (``true``/``false`` are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x: Any) -> bool:
    """Whether a JSON value is an integer (``true``/``false`` are not)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _esd_ok(v: Any) -> bool:
    """Whether a module's ``esd`` entry has the types the report reads (``spectra diff --esd``)."""
    if v is None:
        return True
    if not isinstance(v, dict) or not all(v.get(k) is None or is_num(v[k]) for k in ("alpha_change", "alpha_change_z")):
        return False
    for side in ("base", "tuned", "delta"):
        rec = v.get(side)
        if rec is not None and not (isinstance(rec, dict)
                                    and all(rec.get(k) is None or is_num(rec[k]) for k in ("alpha", "sigma", "D", "xmin"))):
            return False
    return True


def check_document(d: Any, source: Any, *, unique: bool = True) -> None:
    """Raise :class:`ResultsFormatError` unless ``d`` is a ``spectra.diff/1`` document whose keys
    have the types :meth:`DiffResult.from_dict` and the report use; with ``unique``, each matrix once
    (a journal may repeat a record: the resume keeps one and says so)."""
    def fail(what: str, got: Any, key: str) -> None:
        raise ResultsFormatError(f"{key} must be {what}. Got {_type(got)} instead", path=source,
                                 hint="this file was not written by spectra diff or was edited; rerun spectra diff --out")

    if not isinstance(d, dict):
        fail("a JSON object", d, "results.json")
    if d.get("schema") != SCHEMA:
        raise newer_schema_error(d.get("schema"), [SCHEMA], source) or ResultsFormatError(
            f"schema must be {SCHEMA!r}. Got {d.get('schema')!r} instead", path=source, hint="pass a results.json written by spectra diff")
    for key in ("tuned", "thresholds", "modules"):
        if key not in d:
            raise ResultsFormatError(f"missing key {key!r}", path=source, hint="rerun spectra diff --out")
    if not isinstance(d["tuned"], str):
        fail("a string", d["tuned"], "tuned")
    if d.get("base") is not None and not isinstance(d["base"], str):
        fail("a string or null", d["base"], "base")
    th = d["thresholds"]
    if not isinstance(th, list) or not th or not all(is_num(t) and 0 < t <= 1 for t in th):
        fail("a non-empty array of numbers in (0, 1]", th, "thresholds")
    if any(b <= a for a, b in zip(th, th[1:])):  # spectra diff writes them sorted, each once
        impossible("thresholds", th, "each threshold is listed once, in increasing order", source)
    keys = [threshold_key(t) for t in th]
    if not isinstance(d["modules"], list):
        fail("an array of objects", d["modules"], "modules")
    for key, kind in (("skipped", list), ("warnings", list), ("config", dict), ("unmatched", dict)):
        if key in d and not isinstance(d[key], kind):
            fail("an array" if kind is list else "an object", d[key], key)
    for i, s in enumerate(d.get("skipped", [])):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("reason"), str)):
            fail('an object with string "name" and "reason"', s, f"skipped[{i}]")
    if not all(isinstance(w, str) for w in d.get("warnings", [])):
        fail("an array of strings", d["warnings"], "warnings")
    for side, names in (d.get("unmatched") or {}).items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail("an array of strings", names, f"unmatched.{side}")
    for key in ("elapsed_s",):
        if key in d and not (is_num(d[key]) and d[key] >= 0):
            fail("a non-negative number", d[key], key)
    if d.get("device") is not None and not isinstance(d["device"], str):  # the report printed "on 5"
        fail("a string or null", d["device"], "device")
    if "complete" in d and not isinstance(d["complete"], bool):  # "no" would read as a finished run
        fail("true or false", d["complete"], "complete")
    seen: set[str] = set()
    for i, m in enumerate(d["modules"]):
        at = f"modules[{i}]"
        if not isinstance(m, dict):
            fail("an object", m, at)
        for key, ok, what in (
            ("name", lambda v: isinstance(v, str), "a string"),
            ("module", lambda v: isinstance(v, str), "a string"),
            ("shape", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 0 for x in v),
             "an array of two non-negative integers"),
            ("fro_norm", lambda v: is_num(v) or v is None, "a number"),
            ("spectral_norm", lambda v: is_num(v) or v is None, "a number"),
            ("stable_rank", lambda v: is_num(v) or v is None, "a number"),
            ("energy_rank", lambda v: isinstance(v, dict) and all(k in v and is_int(v[k]) for k in keys),
             f"an object with an integer for each threshold ({', '.join(keys)})"),
            ("random_energy_rank", lambda v: isinstance(v, dict) and all(k in v and is_int(v[k]) for k in keys),
             f"an object with an integer for each threshold ({', '.join(keys)})"),
            ("singular_values", lambda v: isinstance(v, list) and all(is_num(x) or x is None for x in v), "an array of numbers"),
        ):
            if key not in m:
                raise ResultsFormatError(f"{at}: missing key {key!r}", path=source, hint="rerun spectra diff --out")
            if not ok(m[key]):
                fail(what, m[key], f"{at}.{key}")
        for key, ok, what in (
            ("layer", lambda v: v is None or (is_int(v) and v >= 0), "a non-negative integer or null"),
            ("expert", lambda v: v is None or (is_int(v) and v >= 0), "a non-negative integer or null"),
            ("rel_norm", lambda v: v is None or is_num(v), "a number or null"),
            ("base_fro_norm", lambda v: v is None or is_num(v), "a number or null"),
            ("effective_rank", lambda v: v is None or is_num(v), "a number or null"),
            ("lora_r", lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null"),
            ("note", lambda v: isinstance(v, str), "a string"),
            ("role", lambda v: v is None or isinstance(v, str), "a string or null"),
            ("energy_rank_frac", lambda v: isinstance(v, dict) and all(is_num(x) for x in v.values()), "an object of numbers"),
            ("seconds", lambda v: is_num(v) and v >= 0, "a non-negative number"),
            ("rounding_floor", lambda v: v is None or is_num(v), "a number or null"),
            ("energy_rank_bounds", lambda v: v is None or isinstance(v, dict), "an object or null"),
            ("esd", _esd_ok, 'null or an object whose "base", "tuned" and "delta" are objects (numbers or null for '
                             'alpha, sigma, D, xmin) or null'),
        ):
            if key in m and not ok(m[key]):
                fail(what, m[key], f"{at}.{key}")
        _check_module_values(m, f"{at} ({m['name'][:80]})", source)
        if unique and m["name"] in seen:  # counted twice in every total and figure
            impossible(f"{at}.name", m["name"][:80], "each matrix has one record; this name came before", source)
        seen.add(m["name"])


def _check_module_values(m: dict[str, Any], at: str, source: Any) -> None:
    """Refuse values no ΔW can have (a hand edit, a corruption): the report would show them as numbers.
    ``m`` has passed the type checks of :func:`check_document`."""
    p = min(m["shape"])
    if p < 1:  # spectra diff skips empty matrices: none is ever in ``modules``
        impossible(f"{at}.shape", m["shape"], "a matrix has at least one row and one column", source)
    if not all(is_axis(n) for n in m["shape"]):  # the checkpoint readers refuse such an axis
        impossible(f"{at}.shape", m["shape"], f"no axis spectra reads is larger than {MAX_DIM} (2^31)", source)
    for key in ("layer", "expert"):
        if is_int(m.get(key)) and m[key] >= MAX_INDEX:
            impossible(f"{at}.{key}", m[key], "an index in a tensor name has at most 18 digits", source)
    for key in ("energy_rank", "random_energy_rank", "signal_rank"):
        ranks = m.get(key) if isinstance(m.get(key), dict) else {"": m.get(key)}
        for k, v in ranks.items():
            if is_int(v) and not 0 <= v <= p:
                impossible(f"{at}.{key}{f'[{k}]' if k else ''}", v, f"a rank lies from 0 to min(shape) = {p}", source)
    for k, v in (m.get("energy_rank_frac") or {}).items():
        if is_num(v) and not 0 <= v <= 1:
            impossible(f"{at}.energy_rank_frac[{k}]", v, "a share of min(shape) lies from 0 to 1", source)
    # ‖ΔW‖_F²/σ₁² and exp(entropy) are at most p (an approximate run's σ₁ is a sketch's lower bound: not checked)
    for key in ("stable_rank", "effective_rank") if not str(m.get("method", "")).startswith("approx") else ():
        v = m.get(key)
        if is_num(v) and v > p * (1 + 1e-9):
            impossible(f"{at}.{key}", v, f"it is at most min(shape) = {p}", source)
    # s·B·A (measured from its factors) has at most r directions: "3 of 1 ranks used" is an edit
    if m.get("method") == "factored" and (r := m.get("lora_r")) is not None:
        if not (is_int(r) and r >= 1):
            impossible(f"{at}.lora_r", r, "a LoRA rank is a whole number of at least 1", source)
        cap = min(r, p)
        for key in ("energy_rank", "signal_rank", "stable_rank", "effective_rank"):
            ranks = m.get(key) if isinstance(m.get(key), dict) else {"": m.get(key)}
            for k, v in ranks.items():
                if is_num(v) and v > cap * (1 + 1e-9):
                    impossible(f"{at}.{key}{f'[{k}]' if k else ''}", v,
                               f"s·B·A of LoRA rank {r} has at most {cap} direction{'s' * (cap != 1)}", source)
        if sum(1 for x in m["singular_values"] if is_num(x) and x > 0) > cap:
            impossible(f"{at}.singular_values", "…",
                       f"s·B·A of LoRA rank {r} has at most {cap} non-zero singular value{'s' * (cap != 1)}", source)
    values = [float(x) for x in m["singular_values"] if is_num(x)]
    if len(m["singular_values"]) > p:
        impossible(f"{at}.singular_values", f"{len(m['singular_values'])} values", f"a matrix has min(shape) = {p}", source)
    if any(b > a for a, b in zip(values, values[1:])):
        impossible(f"{at}.singular_values", "…", "they are listed largest first", source)
    top, nuc = m.get("spectral_norm"), m.get("nuclear_norm")
    if is_num(top) and is_num(nuc) and nuc < top * (1 - 1e-6):
        impossible(f"{at}.nuclear_norm", nuc, f"the sum of the singular values is at least σ₁ ({top})", source)
    for key in ("fro_norm", "spectral_norm", "nuclear_norm", "base_fro_norm", "rel_norm", "stable_rank", "effective_rank"):
        v = m.get(key)
        if is_num(v) and not v >= 0:
            impossible(f"{at}.{key}", v, "norms and ranks are not negative", source)
    # a singular value of rounding noise: recommend compares σᵢ with it, so -1 or inf would keep or drop every one
    if is_num(floor := m.get("rounding_floor")) and not 0 <= floor < math.inf:
        impossible(f"{at}.rounding_floor", floor, "a rounding floor is a finite number, not negative (null: unknown)", source)
    # τ = 1 is the numerical rank, which may be below the cumulative-sum rank at τ = 1 − 1e-13: left out
    ranks = sorted(((float(k), v) for k, v in m["energy_rank"].items() if is_int(v) and float(k) < 1.0), key=lambda kv: kv[0])
    if any(b[1] < a[1] for a, b in zip(ranks, ranks[1:])):
        impossible(f"{at}.energy_rank", m["energy_rank"], "energy ranks do not fall as τ rises", source)
    fro, top, base, rel = m.get("fro_norm"), m.get("spectral_norm"), m.get("base_fro_norm"), m.get("rel_norm")
    if is_num(fro) and is_num(top) and top > fro * (1 + 1e-3) + 1e-300:  # float32-certified values: ~p·u off
        impossible(f"{at}.spectral_norm", top, f"σ₁ is at most ‖ΔW‖_F ({fro})", source)
    if is_num(fro) and all(is_num(x) for x in m["singular_values"]) and math.isfinite(fro) \
            and math.fsum(float(x) * float(x) for x in m["singular_values"]) > fro * fro * (1 + 1e-3) + 1e-300:
        impossible(f"{at}.singular_values", "…", f"their squares sum to more than ‖ΔW‖_F² ({fro}²)", source)
    if is_num(fro) and is_num(base) and is_num(rel) and base > 0 and math.isfinite(fro / base) \
            and not math.isclose(rel, fro / base, rel_tol=1e-6, abs_tol=1e-300):
        impossible(f"{at}.rel_norm", rel, f"it is fro_norm / base_fro_norm = {fro / base:.6g}", source)
    if any(is_num(x) and x < 0 for x in m["singular_values"]):
        impossible(f"{at}.singular_values", min(x for x in m["singular_values"] if is_num(x)),
                   "singular values are not negative", source)
    # recommend gives an approximate record its upper bound: it must contain the estimate, within 0..p
    for k, b in (m.get("energy_rank_bounds") or {}).items():
        est = m["energy_rank"].get(k)
        if not (isinstance(b, list) and len(b) == 2 and all(is_int(x) for x in b) and 0 <= b[0] <= b[1] <= p
                and (not is_int(est) or b[0] <= est <= b[1])):
            impossible(f"{at}.energy_rank_bounds[{k}]", b, f"bounds are [lo, hi] with 0 <= lo <= energy_rank <= hi <= "
                                                          f"min(shape) = {p}", source)
    for k, v in (m.get("energy_rank_frac") or {}).items():  # after the ranks' own checks, which say more
        rank = m["energy_rank"].get(k)
        if is_num(v) and is_int(rank) and not math.isclose(v, rank / p, rel_tol=1e-9, abs_tol=1e-12):
            impossible(f"{at}.energy_rank_frac[{k}]", v, f"it is energy_rank / min(shape) = {rank}/{p}", source)


def check_journal_records(records: list[dict], thresholds: list[float], known: set[str] | None, source: Any) -> None:
    """Refuse journal records (``{"module": …}`` / ``{"skipped": …}``) that a resumed run must not take
    in: any :func:`check_document` would refuse in ``results.json``, and names the run does not analyse
    (``known``: the names of its planned units; None: not checked). Called before anything is written.

    Raises:
        ResultsFormatError: one line naming the journal, the record and the field.
    """
    modules = [r["module"] for r in records if "module" in r]
    skipped = [r["skipped"] for r in records if "skipped" in r]
    check_document({"schema": SCHEMA, "tuned": "", "thresholds": thresholds, "modules": modules, "skipped": skipped}, source,
                   unique=False)
    for entry in (*modules, *skipped):
        if known is not None and entry["name"] not in known:
            raise ResultsFormatError(f"the journal holds a record of {entry['name'][:120]!r}, which this run does not "
                                     "analyse (another model's journal, or an edited one)", path=source,
                                     hint="run without --resume into a new folder")


def unique_names(records: Any, source: Any, rerun: str) -> None:
    """Refuse a results file listing a matrix twice (an edited file, or one written from a journal with a line
    repeated): a report would count it twice in its medians and tables. ``records``: the file's list of matrix
    records; those that are not objects with a string name are left to the per-record checks.

    Raises:
        ResultsFormatError: one line naming ``source``, the record and the name (:func:`impossible`).
    """
    seen: set[str] = set()
    for i, m in enumerate(records if isinstance(records, list) else []):
        name = m.get("name") if isinstance(m, dict) else None
        if isinstance(name, str) and name in seen:
            impossible(f"matrices[{i}].name", name[:120], "each matrix has one record; this name came before", source, rerun=rerun)
        if isinstance(name, str):
            seen.add(name)


def impossible(where: str, value: Any, why: str, source: Any, rerun: str = "spectra diff --out") -> None:
    """Raise the one-line error for a value a results file cannot hold (naming the file, the record and the field).

    Raises:
        ResultsFormatError: always.
    """
    raise ResultsFormatError(f"{where} is {value!r}, which is impossible: {why}", path=source,
                             hint=f"the file was edited or damaged; rerun {rerun} to rewrite it")


def trace_rerun(source: Any) -> str:
    """What rewrites a trace: ``spectra trace`` its trace.json; a tracker's trace.jsonl only the training that wrote it."""
    return "the training that wrote it (spectra train --trace-every, SpectraTracker)" if str(source).endswith(".jsonl") else "spectra trace --out"


def damaged_hint(source: Any) -> str:
    """The hint of a refused trace file (``source``): what rewrites it."""
    return f"the file was edited or damaged; rerun {trace_rerun(source)} to rewrite it"


def newer_schema_error(schema: Any, known: Iterable[str], source: Any) -> ResultsFormatError | None:
    """The error for a results file of a newer version of a known schema (``spectra.diff/2`` where this
    spectra reads ``spectra.diff/1``), or None when ``schema`` is not that."""
    from spectra._version import __version__

    if not isinstance(schema, str) or "/" not in schema:
        return None
    kind, _, version = schema.rpartition("/")
    for k in known:
        own, _, mine = k.rpartition("/")
        # ASCII digits, bounded: int() refuses '²' (which isdigit accepts) and runs over 4300 digits
        if own == kind and all(v.isascii() and v.isdigit() and len(v) < 10 for v in (version, mine)) \
                and int(version) > int(mine):
            return ResultsFormatError(f"written by a newer spectra (schema {schema}); this spectra {__version__} reads "
                                      f"{k}", path=source, hint="upgrade spectra (pip install -U spectra) to read it")
    return None


__all__ = ["SCHEMA", "check_document", "check_journal_records", "impossible", "is_int", "is_num", "newer_schema_error"]
