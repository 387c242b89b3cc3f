"""The journal of a diff run: every result appended to ``results.jsonl`` as it is computed, folded
into ``results.json`` every few seconds, and read back by ``--resume`` under the same run fingerprint
(inputs and result-affecting options), so an interrupted run loses at most one batch."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spectra.config import DiffConfig
from spectra.errors import ConfigError, ResultsFormatError, output_error
from spectra.io.checkpoint import Checkpoint
from spectra.io.files import OutputLock, atomic_write_text, content_sample, hash_spread, remove_earlier_outputs
from spectra.io.jsonfile import RESULTS_MAX_BYTES, finite_or_null, load_json, load_jsonl, result_json
from spectra.naming import display_name
from spectra.pairing import Skipped
from spectra.results import SCHEMA, DiffResult, ModuleResult
from spectra.results_check import check_journal_records, is_int

#: results.json is rewritten at most this often during a run (the journal has every result at once).
REWRITE_EVERY_S = 5.0
#: ... and no more often than this many times the last rewrite took (at most ~1/8 of a run rewriting).
REWRITE_COST_FACTOR = 8.0

#: The largest journal ``--resume`` reads (a million matrices' records are about 2 GB).
JOURNAL_MAX_BYTES = 4 << 30


#: DiffConfig fields that change the numbers a run writes (the others only change how it runs).
RESULT_FIELDS = ("thresholds", "include", "exclude", "layers", "top_k", "method", "precision", "split_fused",
                  "approx", "approx_above", "approx_tol", "seed", "weight_spectra", "esd")


#: diff's journal in its folder: one line per matrix as it is analysed (``--resume``).
JOURNAL = "results.jsonl"


@functools.cache
def code_identity() -> str:
    """A hash of the running spectra's source (every ``.py`` file of the package, by path and content; ~5 ms,
    once): a journal written by other code (an upgrade, a ``git pull`` between a stop and its resume) is not
    resumed, where its records and the new code's would be mixed in one result."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(base: Checkpoint, tuned: Checkpoint, config: DiffConfig, *, portable: bool = False) -> str:
    """A hash of the inputs (:func:`checkpoint_identity`: tensors, files, config.json, index) and of
    the result-affecting options: a journal is resumed only under the same one. ``portable``: the
    files by name, size and content only (not path or modification time), the same for copies of
    the same files on other machines: what the ranks of a distributed run compare."""
    return _fingerprint(config, [checkpoint_identity(c, portable=portable) for c in (base, tuned)])


def _fingerprint(config: DiffConfig, identities: list[list]) -> str:
    h = hashlib.sha256(json.dumps({k: getattr(config, k) for k in RESULT_FIELDS}, sort_keys=True, default=list).encode())
    h.update(code_identity().encode())
    for identity in identities:
        h.update(json.dumps(identity).encode())
    return h.hexdigest()[:16]


def diff_identity(base: Checkpoint, tuned: Checkpoint, config: DiffConfig) -> tuple[str, dict[str, str]]:
    """``(fingerprint, identity)``: :func:`run_fingerprint`, and what results.json keeps so that a refused ``--resume``
    names its cause (:func:`_other_diff`): ``{"code": code_identity(), "base": …, "tuned": …, "deciding": …}``, each
    input's short hash of :func:`checkpoint_identity` (files, times, tensors, deciding files), read once for both, and
    its deciding files' digests by name (:func:`deciding_digests`)."""
    ids = [checkpoint_identity(c) for c in (base, tuned)]
    return _fingerprint(config, ids), {"code": code_identity(), "base": _short_hash(ids[0]), "tuned": _short_hash(ids[1]),
                                       "deciding": {"base": deciding_digests(ids[0]), "tuned": deciding_digests(ids[1])}}


def _short_hash(identity: list) -> str:
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


#: The entry of :func:`deciding_digests` for the rest of an input's identity: its weight files and their tensors.
WEIGHTS_KEY = "(weights)"


def deciding_digests(identity: list) -> dict[str, str | None]:
    """File name -> short content digest of each :data:`DECIDING_FILES` file of a :func:`checkpoint_identity`, and
    :data:`WEIGHTS_KEY` -> a short hash of the rest (weight files, tensors): kept beside the identity's one hash so
    that a refused ``--resume`` names an edited ``config.json`` apart from the weights, and both when both changed."""
    rest = [*identity[:3], *identity[5:]]  # without the parsed config.json (3) and the deciding files (4)
    return {**{str(n): d[:16] if isinstance(d, str) else None for n, d in identity[4]}, WEIGHTS_KEY: _short_hash(rest)}


def changed_files(then: object, now: dict[str, str | None]) -> list[str]:
    """The entries of :func:`deciding_digests` that differ between an earlier record ``then`` (None or malformed in
    older results: none named) and ``now``, added and removed ones included."""
    if not isinstance(then, dict):
        return []
    return sorted(n for n in set(then) | set(now) if then.get(n) != now.get(n))


def changed_text(where: str, changed: list[str], path: str) -> str:
    """``"<where> changed since (…): <path>"``, naming the edited deciding files (:func:`changed_files`) and their
    folder where they changed, the weights where they did (or where nothing tells)."""
    files = [n for n in changed if n != WEIGHTS_KEY]
    what = "content, size, times or metadata: chmod or a new hard link counts"
    if files:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        both = f" and the weights ({what})" if WEIGHTS_KEY in changed else ""
        return f"{', '.join(files[:3])}{both} of {where} changed since: {display_name(folder)}"
    return f"{where} changed since ({what}): {display_name(path)}"


#: Small files beside the weights that decide results (head counts and layout, which shard holds a
#: tensor, LoRA ranks and alphas): their content goes into the fingerprint.
DECIDING_FILES = ("config.json", "adapter_config.json", "*.index.json")


def checkpoint_identity(ckpt: Checkpoint, *, portable: bool = False) -> list:
    """What identifies a checkpoint's results for ``--resume``: its format; each weight file's resolved
    path, size, modification and change times and a sample of its content (:func:`content_sample`); each tensor's
    name, shape, dtype and offset; the parsed ``config.json``; and the content digest of each
    :data:`DECIDING_FILES` file in its folder (or of the index passed).

    Not the label: the same files named another way (``./m``, an absolute path, a symlink, the folder
    or its ``model.safetensors``) are the same inputs; paths are compared resolved (``realpath``)."""
    # portable: each file by the name its folder gives it (a hub snapshot links model.safetensors to blobs/<sha>)
    named = {os.path.realpath(t.file): os.path.basename(t.file) for t in ckpt.tensors.values()}
    files = sorted(named)
    root = Path(ckpt.root)
    folder = root if root.is_dir() else root.parent
    deciding = {q for pattern in DECIDING_FILES for q in folder.glob(pattern) if q.is_file()}
    if root.is_file() and root.suffix == ".json":
        deciding.add(root)
    digests = []
    for q in sorted(deciding):
        try:
            digests.append((q.name, hashlib.sha256(q.read_bytes()).hexdigest()))
        except OSError:
            digests.append((q.name, None))
    stats = {f: os.stat(f) for f in files}
    # the change time too: os.utime puts a modification time back after an edit in place (the content sample,
    # 64 KiB, misses most tensors of a large file), and no call sets st_ctime back (chmod, chown and a new hard
    # link also set it: a resume after them is refused, which OTHER_INPUTS says)
    where = [(named[f],) if portable else (f, stats[f].st_mtime_ns, stats[f].st_ctime_ns) for f in files]
    return [ckpt.format, [(*w, stats[f].st_size, content_sample(f)) for w, f in zip(where, files)],
            sorted((n, list(t.shape), t.dtype, t.entry.start if t.entry else -1) for n, t in ckpt.tensors.items()),
            json.dumps(ckpt.config, sort_keys=True, default=str), digests, *([tensor_samples(ckpt)] if portable else [])]


#: Chunks read from each tensor of a safetensors file for the identity the ranks of a distributed run compare (at
#: most; down to its first and last, and shorter than 4 KiB, past :data:`TENSOR_SAMPLE_CHUNKS` chunks in all).
TENSOR_SAMPLES = 8
TENSOR_SAMPLE_CHUNKS = 16384


def tensor_samples(ckpt: Checkpoint) -> str | None:
    """SHA-256 of chunks spread evenly over each safetensors tensor's data, its first and last bytes included
    (:data:`TENSOR_SAMPLES` of 4 KiB per tensor; fewer and smaller past :data:`TENSOR_SAMPLE_CHUNKS` in all, 64 MiB
    read at most): the file-wide sample (:func:`content_sample`, 16 chunks) misses a copy whose changed tensors lie
    between its chunks (a LoRA merged into q and v: 6% of such copies of a 7B model), while a tensor changed as a whole
    (fine-tuned, merged, rescaled) differs in each of its own chunks. None when a file cannot be read; ``.bin`` tensors
    (no byte range) are left to the file-wide sample."""
    by_file: dict[str, list] = {}
    for t in ckpt.tensors.values():
        if t.entry is not None:
            by_file.setdefault(t.file, []).append(t.entry)
    n = sum(len(v) for v in by_file.values())
    per = max(2, min(TENSOR_SAMPLES, TENSOR_SAMPLE_CHUNKS // max(1, n)))
    chunk = max(64, min(4096, (TENSOR_SAMPLE_CHUNKS << 12) // max(1, n * per)))
    h = hashlib.sha256()
    try:
        for file in sorted(by_file):
            fd = os.open(file, os.O_RDONLY)
            try:
                for e in sorted(by_file[file], key=lambda e: e.start):
                    hash_spread(h, fd, e.start, e.nbytes, samples=per, chunk=chunk)
            finally:
                os.close(fd)
    except OSError:
        return None
    return h.hexdigest()


#: Why a journal is not resumed. A weight file's change time is part of its identity (an edit in place with its
#: modification time put back is otherwise missed between the content samples), so metadata changes count too.
OTHER_INPUTS = ("the journal here comes from different inputs or options (or another version of spectra; a weight file "
                "changed since, its metadata included: chmod or a new hard link counts)")


#: What ``spectra diff`` writes besides results.json/jsonl; removed when a new (not resumed) run starts.
STALE_DIFF_FILES = ("results.csv", "diff_config.json", "rank_heatmap.png", "relnorm_heatmap.png", "alpha_base_tuned.png",
                    "report.html")


def seal_of(fingerprint: str, record: dict) -> str:
    """A journal record's seal: a hash of its content and of its run's fingerprint (not a secret: a check that a
    record read back on ``--resume`` is the one the run wrote, so that a hand edit is refused, not written into the
    results)."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)
    return hashlib.sha256((fingerprint + "\n" + text).encode()).hexdigest()[:16]


def changed_record(line: int, path: Path) -> ResultsFormatError:
    """The error for journal record ``line`` whose seal does not match."""
    return ResultsFormatError(f"record {line} was changed after it was written (its seal does not match), or is not one "
                              "this command wrote", path=path, hint="run without --resume into a new folder")


class Journal:
    """Journal each result to ``results.jsonl`` at once, sealed (:func:`seal_of`, with the run's fingerprint); fold
    into ``results.json`` periodically."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.journal = out_dir / JOURNAL
        self.last = 0.0
        self.save_s = 0.0  # how long the last rewrite of results.json took
        self.lock: OutputLock | None = None  # held from start() to finish() (or flush() on a stop)
        self.fingerprint = ""  # the run's (records are sealed with it)

    def start(self, result: DiffResult, *, resume: bool = False, known: set[str] | None = None) -> list[dict]:
        """Begin a run; with ``resume``, return the journal's records of an earlier run with the same
        fingerprint (inputs and result-affecting options) and append to it, else start afresh. The
        records are checked as ``results.json`` is (:func:`spectra.results_check.check_journal_records`;
        ``known``: the names the run analyses) before anything is written.

        Raises:
            ConfigError: ``resume`` with no journal, or a journal from other inputs or options.
            OutputError: the folder cannot be written, or another run is writing into it.
        """
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.out_dir, exc) from exc
        if self.lock is None:
            self.lock = OutputLock.acquire(self.out_dir)
        self.fingerprint = result.fingerprint
        done: list[dict] = []
        if resume:
            previous = self.out_dir / "results.json"
            if not (self.journal.is_file() and previous.is_file()):
                raise ConfigError("nothing to resume: results.jsonl or results.json is missing", path=self.out_dir,
                                  hint="run without --resume first")
            doc = load_json(previous, what="results.json", error=ResultsFormatError, lone_surrogates=True,
                            max_bytes=RESULTS_MAX_BYTES)
            old = doc.get("fingerprint") if isinstance(doc, dict) else None
            if old != result.fingerprint:
                raise ConfigError(_other_diff(doc, result), path=self.out_dir,
                                  hint="pass the same BASE, TUNED and options, or run without --resume into a new folder")
            done = read_records(self.journal)
            for i, rec in enumerate(done, 1):
                entry = next((rec[k] for k in ("module", "skipped") if isinstance(rec, dict) and k in rec), None)
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                    raise ResultsFormatError(
                        f"record {i} must be {{\"module\": {{…}}}} or {{\"skipped\": {{…}}}} with a string name. "
                        f"Got {str(rec)[:80]!r} instead", path=self.journal,
                        hint="the journal was edited: run without --resume into a new folder")
            done = [self._unsealed(rec, i) for i, rec in enumerate(done, 1)]  # after the shape's checks, which say more
            check_journal_records(done, result.thresholds, known, self.journal)
        else:
            # a new run replaces the folder's results: when the folder holds an earlier diff, its files that
            # this run may not rewrite (figures, report) go, so none describes other inputs beside the new
            # results.json; a folder without one keeps every file (they are not a diff's)
            remove_earlier_outputs(self.out_dir, "results.json", SCHEMA, STALE_DIFF_FILES)
            atomic_write_text(self.journal, "")
        result.save_json(self.out_dir / "results.json")
        self.last = time.monotonic()
        return done

    def _unsealed(self, rec: dict, line: int) -> dict:
        body = {k: v for k, v in rec.items() if k != "seal"}
        if rec.get("seal") != seal_of(self.fingerprint, body):
            raise changed_record(line, self.journal)
        return body

    def add(self, result: DiffResult, module: ModuleResult | None, skipped: Skipped | None) -> None:
        rec = finite_or_null({"module": asdict(module)} if module is not None else {"skipped": asdict(skipped)})
        append_record(self.journal, {**rec, "seal": seal_of(self.fingerprint, rec)})
        # each rewrite serialises every record so far: spaced by a multiple of its own cost, so that on
        # 16k matrices (5 s a save) the run is not mostly rewriting (the journal holds every result anyway)
        if time.monotonic() - self.last >= max(REWRITE_EVERY_S, REWRITE_COST_FACTOR * self.save_s):
            start = time.monotonic()
            result.save_json(self.out_dir / "results.json")
            self.last = time.monotonic()
            self.save_s = self.last - start

    def flush(self, result: DiffResult) -> None:
        """Write ``results.json`` now (``complete`` stays False on an interrupted run) and release the folder."""
        try:
            result.save_json(self.out_dir / "results.json")
        finally:
            self.release()

    def finish(self, result: DiffResult, *, plots: bool) -> None:
        try:
            result.save(self.out_dir, plots=plots)
            atomic_write_text(self.out_dir / "diff_config.json", json.dumps(result.config, indent=2, sort_keys=True) + "\n")
        finally:
            self.release()

    def release(self) -> None:
        """Release the output folder's lock (the process's exit releases it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def absorb(result: DiffResult, records: list[dict]) -> set[str]:
    """Add journal records (``{"module": …}`` / ``{"skipped": …}``, as :meth:`Journal.start` checked
    them) to ``result``; their names."""
    names: set[str] = set()
    known = set(ModuleResult.__dataclass_fields__)
    # an edited or concatenated journal: one result per name, the first (with a warning)
    for rec in first_of_each(records, lambda r: (r.get("module") or r.get("skipped") or {}).get("name"), result.warnings):
        entry = rec.get("module", rec.get("skipped"))
        if entry is None:
            continue
        names.add(entry["name"])
        if "module" in rec:
            result.modules.append(ModuleResult(**{k: v for k, v in entry.items() if k in known}))
        else:
            result.skipped.append(entry)
    return names


def first_of_each(records: list, key: Callable[[object], Hashable | None], warnings: list[str], *,
                  held: str = "the journal", of: str = "a matrix", seen: Iterable[Hashable] = ()) -> list:
    """``records`` less each whose ``key`` came before (in ``seen`` or an earlier record), and one line in
    ``warnings`` saying how many were left out. A line repeated by hand, or two journals joined, would
    otherwise list one matrix twice in the result, counted twice in its totals and medians; the first of
    each is kept, as :func:`absorb` keeps diff's. A record whose key is None (not of the shape the caller
    keys on) is kept, for the caller's checks to refuse."""
    known, kept, repeated = set(seen), [], 0
    for rec in records:
        k = key(rec)
        if k is not None and k in known:
            repeated += 1
            continue
        if k is not None:
            known.add(k)
        kept.append(rec)
    if repeated:
        warnings.append(f"{held} held {repeated} repeated record(s) of {of} already recorded; the first of each was kept")
    return kept


def first_by_index(records: list[tuple[int, Any]], warnings: list[str], *, of: str) -> list[tuple[int, Any]]:
    """:func:`first_of_each` of a sealed journal's ``(line, record)`` pairs keyed on each record's plan index ``"i"``
    (compare's and interfere's journals)."""
    return first_of_each(records, lambda r: r[1].get("i") if isinstance(r[1], dict) and is_int(r[1].get("i")) else None,
                         warnings, of=of)


def read_records(path: Path) -> list[dict]:
    """The whole records of a JSON-lines journal, stopping at a line cut short by a kill (that item is
    recomputed); the file is rewritten with the whole records only, so the next append starts on a
    new line."""
    # bounded nesting and size, one-line errors; a line torn by a kill is the last one
    done = load_jsonl(path, what=path.name, max_bytes=JOURNAL_MAX_BYTES, error=ResultsFormatError, skip_torn_tail=True,
                      lone_surrogates=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in done))  # a name may hold a lone surrogate
    return done


def append_record(path: Path, record: dict) -> None:
    """Append one record as a JSON line; NaN/Inf are written as null (the journal must stay valid JSON,
    and ``results.json`` writes them as null with a warning in any case).

    Raises:
        OutputError: the file cannot be written; every line written before this one is kept, and the part of
            this one that was written is cut off again (a full disk left ``{"kind": "full",`` for the next
            record to be glued onto, and every reader stopped there).
    """
    try:
        line = result_json(record, indent=None)
    except ValueError:  # a non-finite number (an overflowing update): null, as in results.json
        line = result_json(finite_or_null(record), indent=None)
    start = None
    try:
        with open(path, "ab") as f:
            start = f.tell()
            f.write((line + "\n").encode("utf-8"))
    except OSError as exc:
        if start is not None:
            with contextlib.suppress(OSError):
                os.truncate(path, start)
        raise output_error(path, exc) from exc



def inputs_fingerprint(checkpoints: list[Checkpoint], options: dict) -> str:
    """A hash of checkpoints (:func:`checkpoint_identity`) and of the options that change the
    results: a journal is resumed only under the same one. For commands other than ``diff``."""
    return run_identity(checkpoints, options)[0]


def run_identity(checkpoints: list[Checkpoint], options: dict, identities: list[list] | None = None) -> tuple[str, dict]:
    """``(fingerprint, about)``: :func:`inputs_fingerprint`, and what it was made of in a form a journal's header keeps
    (``code``: :func:`code_identity`; ``options``; ``inputs``: each checkpoint's resolved path and a hash of its
    identity), from which :func:`other_run` says what differs when a resume is refused. ``identities``: each
    checkpoint's :func:`checkpoint_identity` when the caller has them (they read content samples), else read here."""
    text = json.dumps(options, sort_keys=True, default=list)
    h = hashlib.sha256(text.encode())
    h.update(code_identity().encode())
    inputs = []
    for i, ckpt in enumerate(checkpoints):
        identity = identities[i] if identities is not None else checkpoint_identity(ckpt)  # read once: the fingerprint's and the header's
        h.update(json.dumps(identity).encode())
        inputs.append([os.path.realpath(ckpt.root), _short_hash(identity), deciding_digests(identity)])
    return h.hexdigest()[:16], {"code": code_identity(), "options": json.loads(text), "inputs": inputs}


def _shown(value: object, limit: int = 60) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return display_name(text if len(text) <= limit else text[: limit - 1] + "…")


def _other_diff(doc: object, result: DiffResult) -> str:
    """Why an earlier ``results.json`` (``doc``) is not this diff's: the result-affecting options and the inputs' locations
    it records that differ (:func:`other_run`'s words); :data:`OTHER_INPUTS` when those agree (a file changed, other code)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) or not isinstance(doc.get("inputs"), dict):
        return OTHER_INPUTS
    now = json.loads(json.dumps({k: result.config.get(k) for k in RESULT_FIELDS}, default=list))
    # a key the older results lack is no cause to name (its code's fingerprint differs anyway: the general sentence)
    said = [f"{k} was {_shown(doc['config'][k])}, now {_shown(now[k])}" for k in RESULT_FIELDS
            if k in doc["config"] and doc["config"][k] != now[k]]
    said += [f"{side} was {_shown(doc['inputs'].get(side))}, now {_shown(result.inputs.get(side))}"
             for side in ("base", "tuned") if doc["inputs"].get(side) != result.inputs.get(side)]
    then = doc.get("identity") if isinstance(doc.get("identity"), dict) else {}  # absent in older results
    if then.get("code") not in (None, result.identity.get("code")):
        said.insert(0, "another version of spectra wrote it (its code changed since)")
    deciding = then.get("deciding") if isinstance(then.get("deciding"), dict) else {}
    said += [changed_text(side, changed_files(deciding.get(side), result.identity.get("deciding", {}).get(side, {})),
                          str(result.inputs.get(side))) for side in ("base", "tuned")
             if result.inputs.get(side) and doc["inputs"].get(side) == result.inputs.get(side)
             and then.get(side) not in (None, result.identity.get(side))]
    return "the journal here comes from different inputs or options: " + "; ".join(said[:6]) if said else OTHER_INPUTS


def other_run(then: object, now: dict | None) -> str:
    """Why a journal whose header holds ``then`` (:func:`run_identity`'s ``about``) is not this run's (``now``), in
    words: the code, each option that differs, inputs added, gone, reordered or changed; :data:`OTHER_INPUTS` when
    the header holds none (an older journal) or nothing found differs."""
    if not isinstance(then, dict) or now is None:
        return OTHER_INPUTS
    said = ["another version of spectra wrote it (its code changed since)"] if then.get("code") != now["code"] else []
    old = then.get("options") if isinstance(then.get("options"), dict) else {}
    said += [f"{k} was {_shown(old.get(k))}, now {_shown(now['options'].get(k))}"
             for k in sorted(set(old) | set(now["options"]), key=str) if old.get(k) != now["options"].get(k)]
    before = {str(x[0]): x[1:] for x in then.get("inputs") or [] if isinstance(x, list) and len(x) in (2, 3)}
    after = {str(x[0]): x[1:] for x in now["inputs"]}
    changed = [p for p in after if p in before and before[p][0] != after[p][0]]
    for what, paths in (("added", [p for p in after if p not in before]), ("gone", [p for p in before if p not in after])):
        if paths:
            said.append(f"input{'s' * (len(paths) > 1)} {what}: " + ", ".join(display_name(p) for p in paths[:3])
                        + (f" and {len(paths) - 3} more" if len(paths) > 3 else ""))
    said += [changed_text("input", changed_files(before[p][1] if len(before[p]) > 1 else None, after[p][1]), p) for p in changed[:3]]
    said += [f"and {len(changed) - 3} more inputs changed since"] if len(changed) > 3 else []
    if not said and list(before) != list(after):
        said.append("the same inputs in another order")
    return "the journal here comes from different inputs or options: " + "; ".join(said[:6]) if said else OTHER_INPUTS


def appended_inputs(then: object, now: dict | None, grows: str) -> bool:
    """Whether the run :func:`run_identity` described as ``now`` is the one described as ``then`` with inputs
    appended: the same code and options but ``grows`` (a list, of which ``then``'s is a shorter start), and
    ``then``'s inputs (each path with its identity) the first of ``now``'s."""
    if not (isinstance(then, dict) and now is not None and then.get("code") == now["code"]):
        return False
    old, new = then.get("options"), json.loads(json.dumps(now["options"], default=list))
    if not (isinstance(old, dict) and {k: v for k, v in old.items() if k != grows} == {k: v for k, v in new.items() if k != grows}):
        return False
    was, is_ = old.get(grows), new.get(grows)
    inputs, added = then.get("inputs"), json.loads(json.dumps(now["inputs"], default=list))
    return (isinstance(was, list) and isinstance(is_, list) and len(was) < len(is_) and is_[:len(was)] == was
            and isinstance(inputs, list) and len(inputs) < len(added) and added[:len(inputs)] == inputs)


def prefix_fingerprint(then: object, now: dict, checkpoints: list[Checkpoint], options: dict, grows: str,
                       identities: list[list] | None = None) -> str | None:
    """The fingerprint (:func:`run_identity`) of the run over ``checkpoints`` with ``options`` (whose ``now`` is its
    ``about``) less the inputs appended since the run described by ``then`` (:func:`appended_inputs`), recomputed from
    the inputs (``identities``: theirs, as :func:`run_identity` takes them) and ``then``'s ``grows`` option; None when
    ``then`` is no such run."""
    if not appended_inputs(then, now, grows):
        return None
    n = len(then["inputs"])  # type: ignore[index]
    return run_identity(checkpoints[:n], {**options, grows: then["options"][grows]},  # type: ignore[index]
                        identities[:n] if identities is not None else None)[0]


def start_sealed(path: Path, checkpoints: list[Checkpoint], options: dict, *, resume: bool,
                 clear: Callable[[], None]) -> tuple[RecordJournal, list[tuple[int, dict]]]:
    """Start the journal at ``path`` of a run over ``checkpoints`` with ``options``
    (:func:`inputs_fingerprint`; the folder locked): with ``resume``, the records it holds (their seals
    checked), each with its line number; without, ``clear()`` first removes an earlier run's result files
    and the journal starts afresh.

    Raises:
        ConfigError: ``resume`` without a journal, or a journal of other inputs, options or code.
        ResultsFormatError: a record changed after it was written, or not one of this journal's.
    """
    journal = RecordJournal(path)
    fingerprint, about = run_identity(checkpoints, options)
    records = journal.start(fingerprint, resume=resume, about=about)
    if not resume:  # an earlier run's files here describe another run: gone before this one's first write
        clear()
    return journal, list(enumerate(records, start=2))


class RecordJournal:
    """A resumable JSON-lines journal of per-item records for any streaming command (``esd``,
    ``extract``, ``trace``...): the first line holds the run's fingerprint, each later line one
    finished item, appended as soon as it is computed and sealed (:meth:`sealed`): a resumed run
    refuses a record changed since, which would otherwise go into its results.

    Example:
        >>> import tempfile, pathlib
        >>> j = RecordJournal(pathlib.Path(tempfile.mkdtemp()) / "esd.jsonl")
        >>> j.start("abc", resume=False)
        []
        >>> j.add({"name": "w", "alpha": 3.1})
        >>> RecordJournal(j.path).start("abc", resume=True)
        [{'name': 'w', 'alpha': 3.1}]
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock: OutputLock | None = None  # the folder's lock, held while this journal lives
        self.fingerprint = ""  # the run's, once started (records are sealed with it)
        self.grown = False  # resumed with inputs appended (start's ``earlier``): the earlier run's outputs are stale

    def start(self, fingerprint: str, *, resume: bool, about: dict | None = None,
              earlier: Callable[[object], str | None] | None = None) -> list[dict]:
        """Begin a run; with ``resume``, return the records of an earlier run with the same
        fingerprint and append to it, else start afresh. ``about`` (:func:`run_identity`), kept in the header,
        lets a later refused resume say what differs. ``earlier``, for a run that may be resumed with inputs
        appended (a trace's checkpoints saved since): given the header's ``about``, the fingerprint of this run
        less its last inputs (:func:`prefix_fingerprint`), or None; when it is the journal's, its records are
        returned, :attr:`grown` is set, and the journal goes on under this run's fingerprint (header and seals
        rewritten at once).

        Raises:
            ConfigError: ``resume`` with no journal, or a journal from other inputs or options.
            OutputError: the folder cannot be written, or another run is writing into it.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.path.parent, exc) from exc
        if self.lock is None:
            self.lock = OutputLock.acquire(self.path.parent)
        if not resume:
            atomic_write_text(self.path, json.dumps({"fingerprint": fingerprint, **({"about": about} if about else {})}) + "\n")
            self.fingerprint = fingerprint
            return []
        if not self.path.is_file():
            raise ConfigError(f"nothing to resume: no {self.path.name}", path=self.path.parent, hint="run without --resume first")
        records = read_records(self.path)
        if not records or not isinstance(records[0], dict) or "fingerprint" not in records[0]:
            raise ResultsFormatError("the journal does not open with its run's fingerprint (an edited journal)", path=self.path,
                                     hint="run without --resume into a new folder")
        grown = records[0].get("fingerprint") != fingerprint
        # the header's "about" is not sealed: the earlier run is recomputed from the inputs, not taken from it
        if grown and not (earlier is not None and earlier(records[0].get("about")) == records[0]["fingerprint"]):
            raise ConfigError(other_run(records[0].get("about"), about), path=self.path,
                              hint="pass the same inputs and options, or run without --resume into a new folder")
        self.fingerprint = str(records[0]["fingerprint"])  # the seals are the earlier run's
        out = []
        for line, rec in enumerate(records[1:], start=2):
            body = self.unsealed(rec)
            if body is None:
                raise changed_record(line, self.path)
            out.append(body)
        self.fingerprint, self.grown = fingerprint, grown
        if grown:  # one write: a run stopped now resumes as this one, with every record kept
            atomic_write_text(self.path, "".join(json.dumps(x) + "\n" for x in
                                                 [{"fingerprint": fingerprint, "about": about}, *map(self.sealed, out)]))
        return out

    def add(self, record: dict) -> None:
        """Append one finished item, sealed (NaN/Inf as null first: the seal is of what the line holds)."""
        append_record(self.path, self.sealed(finite_or_null(record)))

    def sealed(self, record: dict) -> dict:
        """``record`` with a ``seal``: a hash of its content and of the run's fingerprint, which
        :meth:`unsealed` checks on resume, so that an edited record is refused rather than written into
        the results (a record is checked for its shape, a seal for its every value)."""
        return {**record, "seal": self._seal(record)}

    def unsealed(self, record: object) -> dict | None:
        """A record :meth:`sealed` wrote, without its seal; None when it is not one or was changed since."""
        if not isinstance(record, dict) or not isinstance(record.get("seal"), str):
            return None
        body = {k: v for k, v in record.items() if k != "seal"}
        return body if record["seal"] == self._seal(body) else None

    def _seal(self, record: dict) -> str:
        return seal_of(self.fingerprint, record)

    def release(self) -> None:
        """Release the folder's lock (dropping the journal or the process's exit releases it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
