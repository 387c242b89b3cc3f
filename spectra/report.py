"""``spectra report``: one self-contained HTML file from the results of spectra's commands.

The report opens with what matters: the warnings that change how the numbers read, then the findings
of each input in words with their numbers, then an overview of the inputs, then each input's
sections. Each kind of result is handled by its own module, chosen by the ``schema`` string of its
JSON in :data:`SECTIONS` (``section_html(path, doc) -> str``) and :data:`FINDINGS`
(``findings(path, doc) -> list[Finding]``, optional); ``train_log.jsonl`` files make the learning
vs forgetting section here.

No network: figures are inline SVG data URIs, styles and the table sorter are inline, no fonts or
scripts are fetched. Every string that comes from a checkpoint or a path is HTML-escaped (tensor
names are untrusted input), and figures never parse names as mathtext. Inputs are validated on
load: a file that is not what spectra writes gives one line (:class:`ResultsFormatError`) naming it.

Inputs are ``results.json`` (``spectra diff``), ``compare.json`` (``spectra compare``), ``esd.json``,
``extract.json``, ``interfere.json``, ``trace.json``/``trace.jsonl``, ``train_log.jsonl`` (``spectra train``), or
folders holding any of them (searched recursively, so ``reports/demo`` works as a whole). Metrics
are defined in docs/definitions.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spectra import (
    comparison,
    esd_run,
    extract_io,
    interfere,
    journal,
    report_compare,
    report_diff,
    report_esd,
    report_extract,
    report_interfere,
    report_trace,
    trace,
)
from spectra.display import safe_text
from spectra.errors import ConfigError, OutputError, ResultsFormatError, SpectraError
from spectra.esd_results import EsdResult
from spectra.findings import Finding
from spectra.io.files import atomic_write_text, refuse_input_as_output, refuse_replacing
from spectra.io.jsonfile import RESULTS_MAX_BYTES, load_json, load_jsonl
from spectra.io.paths import refuse_empty_path
from spectra.lora_targets import untargeted_text
from spectra.plots import learning_forgetting_plot
from spectra.plots.base import svg_img
from spectra.report_html import CSS, DEFINITIONS, SORT_JS, esc, findings_list, note, table, warnings_box
from spectra.results_check import newer_schema_error
from spectra.training_inputs import DEMO_MARK

#: File names looked for in folders: results JSON documents (dispatched by their ``schema``), and the
#: JSON-lines files read by a loader of :data:`JSONL_LOADERS` (``train_log.jsonl`` is read here).
RESULT_FILES = ("results.json", "compare.json", "esd.json", "extract.json", "interfere.json", "trace.json")
TRAIN_LOG = "train_log.jsonl"


@dataclass
class ReportInputs:
    """What was found among the inputs: ``(path, doc)`` of each results JSON, in the order found,
    and the training logs by run label (:func:`run_labels`: unique, so that no run hides another)."""

    docs: list[tuple[Path, dict]] = field(default_factory=list)
    train_logs: dict[str, list[dict]] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)  # folders holding a stopped run's journal and no result
    training: list[str] = field(default_factory=list)  # what makes the training runs' losses incomparable or partial
    unread: list[str] = field(default_factory=list)  # folders under the inputs that could not be read


def input_files(paths: list[str | os.PathLike[str]], unread: list[str] | None = None) -> list[Path]:
    """The files a report reads from ``paths``: each file as given, and in each folder (recursively)
    every result file (:data:`RESULT_FILES`), training log and JSON-lines document; each file once
    (``X`` and ``X/results.json`` name one file: counting it twice would show one run as two). Folders below
    the inputs that cannot be read are said in ``unread`` (:func:`_files_named`).

    Raises:
        SpectraError: a path does not exist.
        ConfigError: a path is empty.
    """
    if isinstance(paths, (str, os.PathLike)):  # one path, not a list: its characters were read as paths ("d: no such file")
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        refuse_empty_path(p, "an empty path names no results")
    for p in map(Path, paths):
        if not p.exists():
            raise SpectraError("no such file or folder", path=p)
        if p.is_dir():
            files += _files_named(p, {*RESULT_FILES, TRAIN_LOG, *JSONL_LOADERS}, unread)
        else:
            files.append(p)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _files_named(root: Path, names: set[str], unread: list[str] | None = None) -> list[Path]:
    """The files under ``root`` (any depth) whose name is one of ``names``, sorted. Links to folders are followed
    (experiment folders link runs in from elsewhere), each real folder walked once (a link loop ends); a demo's
    ``checkpoints/`` (its cache, copied to ``runs/``) is not walked, as the demo's own report leaves it out. A folder
    that cannot be read is said in ``unread``; ``root`` itself is refused. A loop over a stack: ``Path.rglob``
    recursed once per level and raised RecursionError on a folder ~1000 levels deep.

    Raises:
        SpectraError: ``root`` cannot be read."""
    found, stack, seen = [], [root], {os.path.realpath(root)}
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            if folder == root:  # "no spectra results found" blamed the folder's contents
                raise SpectraError(f"cannot read the folder ({exc.strerror or exc})", path=root,
                                   hint="check the folder's permissions") from None
            if unread is not None:
                unread.append(f"{folder}: cannot read the folder ({exc.strerror or exc}): results in it, if any, are not in this report")
            continue
        demo = any(e.name == DEMO_MARK for e in entries)
        for e in entries:
            if e.is_dir() and not (demo and e.name == "checkpoints"):
                if (real := os.path.realpath(e.path)) not in seen:
                    seen.add(real)
                    stack.append(Path(e.path))
            elif e.name in names and e.is_file():
                found.append(Path(e.path))
    return sorted(found)


def run_labels(paths: list[Path]) -> list[str]:
    """A label per training run: the shortest trailing part of its path that no other run shares
    (``expA/run`` and ``expB/run`` for two sweeps that both name a run ``run``; just ``run`` when
    alone), so that runs of different sweeps never replace each other in the report. ``paths`` are
    the runs' folders (or log files without their suffix); the same path twice gets ``(2)``, ``(3)``…"""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for ps in parts:
        n = 1
        while n < len(ps) and any(q != ps and q[-n:] == ps[-n:] for q in parts):
            n += 1
        labels.append(str(Path(*ps[-n:])))
    return [f"{lbl} ({k + 1})" if (k := labels[:i].count(lbl)) else lbl for i, lbl in enumerate(labels)]


def collect(paths: list[str | os.PathLike[str]]) -> ReportInputs:
    """Find and read the results among ``paths`` (files or folders).

    Raises:
        SpectraError: a path does not exist, or nothing was found.
        ResultsFormatError: a file is not JSON, has no known ``schema``, or a training log line is
            not a record of numbers.
    """
    found = ReportInputs()
    logs: list[tuple[Path, list[dict]]] = []
    for f in input_files(paths, found.unread):
        if f.name in JSONL_LOADERS:  # a document kept as JSON lines (e.g. a trace written during training)
            found.docs.append((f, JSONL_LOADERS[f.name](f)))
            continue
        if f.name.endswith(".jsonl"):  # a run is its folder; a log of another name, that file
            logs.append((f.parent if f.name == TRAIN_LOG else f.with_suffix(""), _train_log(f)))
            continue
        # bounded size and nesting, one-line errors (spectra.io.jsonfile); names may hold lone surrogates
        doc = load_json(f, what=f.name, error=ResultsFormatError, lone_surrogates=True, max_bytes=RESULTS_MAX_BYTES)
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if not isinstance(schema, str) or schema not in SECTIONS:
            newer = newer_schema_error(schema, SECTIONS, f)
            if newer is not None:
                raise newer
            shown = schema[:80] + "…" if isinstance(schema, str) and len(schema) > 80 else schema  # one readable line
            raise ResultsFormatError(f"not a spectra result (schema {shown!r})", path=f,
                                     hint=f"pass {', '.join((*RESULT_FILES, 'trace.jsonl', TRAIN_LOG))} or folders holding them "
                                          "(a recommend LoraConfig is not one)")
        if schema in CHECKS:  # before any section counts its records
            CHECKS[schema](f, doc)
        found.docs.append((f, doc))
    found.train_logs = dict(zip(run_labels([p for p, _ in logs]), (recs for _, recs in logs)))
    try:  # a train_config.json edited by hand: one line naming it, not a traceback
        found.training = _training_warnings(logs)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResultsFormatError(f"a train_config.json beside these logs is not as spectra train writes it ({safe_text(str(exc))[:200]})",
                                 path=", ".join(str(f / "train_config.json") for f, _ in logs),
                                 hint="rerun spectra train, or restore the file it wrote") from None
    found.unfinished = [_unfinished(j) for p in map(Path, paths) if p.is_dir() for j in _files_named(p, set(JOURNALS))
                        if not (j.parent / JOURNALS[j.name][1]).is_file()]
    order = list(SECTIONS)  # diffs first, then compares, …; the order found within each kind
    found.docs.sort(key=lambda item: order.index(item[1]["schema"]))
    if not (found.docs or found.train_logs):
        said = found.unfinished or found.unread
        raise SpectraError("no spectra results found" + (f" ({said[0]})" if said else ""),
                           path=", ".join(map(str, paths)),
                           hint="pass results.json, compare.json, train_log.jsonl or folders holding them")
    return found


#: Each command's journal -> (the command, the result it writes when it finishes): a folder holding the
#: journal without the result is a stopped run, which the report names.
JOURNALS = {journal.JOURNAL: ("diff", "results.json"), comparison.JOURNAL: ("compare", "compare.json"),
            interfere.JOURNAL: ("interfere", "interfere.json"), esd_run.JOURNAL: ("esd", "esd.json"),
            extract_io.JOURNAL: ("extract", "extract.json"), trace.JOURNAL: ("trace", "trace.json")}


def _unfinished(journal: Path) -> str:
    """What the report says of a folder holding a run's journal and not its result: a run to finish with
    --resume, or, when the journal holds no record (the run stopped, or was refused, before it finished
    anything), one to run again: resuming it would redo the same start."""
    command, result = JOURNALS[journal.name]
    if _journal_has_records(journal):
        return f"{journal.parent}: an unfinished {command} (its journal {journal.name}, no {result}): finish it with the same command and --resume"
    return (f"{journal.parent}: a {command} that stopped before it finished anything (its journal {journal.name} holds no "
            f"record, no {result}): nothing to resume; run the command again")


#: How much of a journal is read to tell whether it holds a record after its fingerprint line.
_JOURNAL_HEAD = 1 << 16


def _journal_has_records(journal: Path) -> bool:
    """Whether a journal holds a line besides its opening ``{"fingerprint": …}`` (diff's journal has no such line).
    A head too long to tell, or an unreadable file, counts as holding records (said as before)."""
    try:
        with open(journal, "rb") as f:
            head = f.read(_JOURNAL_HEAD)
    except OSError:
        return True
    lines = head.splitlines()
    if lines and lines[0].lstrip().startswith(b'{"fingerprint"'):
        lines = lines[1:]
    return len(head) == _JOURNAL_HEAD or any(line.strip() for line in lines)


def _training_warnings(logs: list[tuple[Path, list[dict]]]) -> list[str]:
    """What the report says of the training runs it shows: a run folder with ``train_config.json`` but no
    ``train_summary.json`` was stopped (its table row would read as a run of that many steps); runs whose
    held-out losses score other blocks (``held_out_digest``: other data, --seq-len, --batch…) are not
    comparable by value."""
    out, digests = [], {"held_out_digest": {}, "source_digest": {}}
    names = dict(zip([f for f, _ in logs], run_labels([f for f, _ in logs])))  # as the table names the runs
    for folder, recs in logs:
        cfg_path = folder / "train_config.json"
        try:
            cfg = load_json(cfg_path, what=cfg_path.name, error=ResultsFormatError) if cfg_path.is_file() else None
        except SpectraError:
            cfg = None
        if not isinstance(cfg, dict):
            continue
        if recs and isinstance(recs[-1].get("error"), str):  # spectra train wrote why it stopped (a divergence)
            out.append(f"{folder}: a spectra train that failed at step {recs[-1].get('step')} ({recs[-1]['error']}; no saved "
                       "model): its row is not a finished run")
        elif not (folder / "train_summary.json").is_file():
            last = recs[-1].get("step") if recs else None
            out.append(f"{folder}: a stopped spectra train (its log ends at step {last} of {cfg.get('steps')}; no "
                       "train_summary.json, no saved model): its row is not a finished run")
        if text := untargeted_text(cfg):  # a LoRA preset that left most of an MoE out: the run is not "all linear"
            out.append(f"{folder}: {text}")
        for key, seen in digests.items():
            if isinstance(cfg.get(key), str):
                seen.setdefault(cfg[key], []).append(names[folder])
    for seen, what in zip(digests.values(), ("target", "source (--eval-source)")):
        if len(seen) > 1:
            groups = "; ".join(", ".join(v) for v in seen.values())
            out.append(f"the training runs' held-out {what} losses score different blocks (other data, --seq-len or "
                       f"--batch): {groups}; compare each run's change, not the values across these groups")
    return out


def _train_log(path: Path) -> list[dict]:
    """The records of a ``train_log.jsonl``, each checked: an object whose ``step`` is an integer and
    whose losses are numbers or null (a last line cut short by a killed run is dropped)."""
    records = []
    for i, rec in enumerate(load_jsonl(path, what=TRAIN_LOG, error=ResultsFormatError, skip_torn_tail=True,
                                       lone_surrogates=True), 1):
        if not isinstance(rec, dict):
            raise ResultsFormatError(f"line {i} must be a JSON object. Got {type(rec).__name__} instead", path=path)
        if i == 1 and "fingerprint" in rec:  # compare.jsonl, extract.jsonl…: what a run keeps for --resume
            raise ResultsFormatError("this is a run's journal, not a result or a training log", path=path,
                                     hint="pass the folder's result (compare.json, extract.json…); a stopped run: "
                                          "finish it with the same command and --resume")
        step = rec.get("step")
        if "step" not in rec or not any(k in rec for k in ("target_loss", "source_loss", "train_loss", "loss", "error")):
            # (diff's results.jsonl, a --data file…)
            raise ResultsFormatError(f"line {i} is no training-log record (a step with its losses, as spectra train writes "
                                     "them)", path=path, hint="pass a train_log.jsonl, or a command's result (results.json…)")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ResultsFormatError(f"line {i}: step must be an integer >= 0. Got {step!r} instead", path=path)
        if records and step < records[-1]["step"]:  # two runs' logs in one file would read as one run
            raise ResultsFormatError(f"line {i}: step {step} after step {records[-1]['step']}: steps must increase (two runs' "
                                     "logs in one file?)", path=path)
        for key in ("target_loss", "source_loss", "loss", "train_loss", "seconds"):
            v = rec.get(key)
            # below 1e300: no training computes a loss near float64's end (1.7e308 broke the figure's axis)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1e300):
                raise ResultsFormatError(f"line {i}: {key} must be a number from 0 to 1e300 or null. Got {v!r} instead", path=path)
        records.append(rec)
    return records


def _guarded(schema: str, path: Path, fn: Callable, doc: dict):
    """Run one schema's handler; a file that passed its schema check but lacks what the handler
    reads (edited by hand) becomes one line naming it instead of a traceback."""
    try:
        return fn(path, doc)
    except SpectraError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise ResultsFormatError(f"cannot build the report from this {schema} file ({type(exc).__name__}: "
                                 f"{safe_text(str(exc))[:200]})", path=path,
                                 hint="a key is missing or of the wrong type, often after a hand edit: rerun the command "
                                      "that wrote it; if it was not edited, this is a bug (SPECTRA_DEBUG=1 shows where)") from exc


#: How every report spectra writes begins: an existing ``-o`` file that does not is not replaced.
HTML_HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'


def build_report(paths: list[str | os.PathLike[str]], *, title: str = "spectra report") -> str:
    """The report's HTML text (see the module docstring for the inputs and the order of sections).

    Raises:
        SpectraError: see :func:`collect`; ResultsFormatError for a malformed input.
    """
    found = collect(paths)
    warn: list[tuple[str, str]] = []
    groups: list[str] = []
    # two results of the same inputs (another --layers, --top-k, a rerun) got the same titles and headings:
    # those say where each came from, by the shortest trailing part of its folder that no other shares
    where = dict(zip((path for path, _ in found.docs), run_labels([path.parent for path, _ in found.docs])))
    titles = [_guarded(d["schema"], p, TITLES[d["schema"]], d) if d["schema"] in TITLES else f"{d['schema']}: {p.parent}"
              for p, d in found.docs]
    for (path, doc), name in zip(found.docs, titles):
        schema = doc["schema"]
        if titles.count(name) > 1:
            name = f"{name} ({where[path]})"
        items = _guarded(schema, path, FINDINGS[schema], doc) if schema in FINDINGS else []
        warn += [(name, f.text) for f in items if f.warning]
        plain = [f.text for f in items if not f.warning]
        if plain:
            groups.append(findings_list(name, plain))
    warn += [("unfinished run", text) for text in found.unfinished]
    warn += [("training runs", text) for text in found.training]
    warn += [("folders not read", text) for text in found.unread]
    parts = [f"<h1>{esc(title)}</h1>", warnings_box(warn)]
    if groups:
        parts.append(f'<section id="findings"><h2>Findings</h2>{"".join(groups)}'
                     f'<p class="small">Every number is defined, with its formula and source, in {DEFINITIONS} of the '
                     "spectra repository; the tables below have legends.</p></section>")
    parts.append(_overview(found))
    sections = [[_guarded(doc["schema"], path, section, doc) for section in SECTIONS[doc["schema"]]] for path, doc in found.docs]
    heads = [_heading(own[0]) if own else None for own in sections]
    for (path, _doc), own, head in zip(found.docs, sections, heads):
        if head is not None and heads.count(head) > 1:
            own[0] = own[0].replace("</h2>", f" ({esc(where[path])})</h2>", 1)
        parts += own
    if found.train_logs:
        parts.append(_learning_section(found.train_logs))
    body = "\n".join(p for p in parts if p)
    text = (f'{HTML_HEAD}<meta name="viewport" content="width=device-width">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}<script>{SORT_JS}</script></body></html>\n")
    return safe_text(text)


def _heading(html: str) -> str | None:
    """The text of the first ``<h2>`` of a section's HTML (None without one)."""
    start = html.find("<h2>")
    end = html.find("</h2>", start)
    return html[start + 4:end] if start >= 0 and end > start else None


def folder_results(out_dir: str | os.PathLike[str], own: str) -> list[Path]:
    """The result files a command's ``--report`` covers: its own (``own``, e.g. ``compare.json``) and
    every other of :data:`RESULT_FILES` directly in ``out_dir``, so that a second command's report into
    the same folder shows both runs instead of replacing the first's."""
    folder = Path(out_dir)
    return [folder / own] + [folder / n for n in RESULT_FILES if n != own and (folder / n).is_file()]


def write_folder_report(out_dir: str | os.PathLike[str], own: str) -> tuple[Path, list[str]]:
    """Write ``out_dir/report.html`` over :func:`folder_results`. Another command's result file in the folder that
    the report refuses (hand-edited, damaged) is left out rather than costing the folder its report: returns the
    path written and, per file left out, its error's text.

    Raises:
        SpectraError: as :func:`write_report`, for ``own``'s file or the output.
    """
    paths = folder_results(out_dir, own)
    target = Path(out_dir) / "report.html"
    try:
        return write_report(paths, target), []
    except SpectraError as exc:
        if isinstance(exc, (OutputError, ConfigError)) or len(paths) == 1:
            raise
    kept, left = paths[:1], []
    for path in paths[1:]:  # which one: each alone (only here, after a failure)
        try:
            build_report([path])
            kept.append(path)
        except SpectraError as exc:
            left.append(str(exc))
    return write_report(kept, target), left


def shared_report(out_dir: str | os.PathLike[str], own: str) -> bool:
    """Whether ``out_dir/report.html`` is a report spectra wrote and the folder also holds another command's
    results (another of :data:`RESULT_FILES` than ``own``). A new run of ``own``'s command removes that report
    with its earlier files; the command then rebuilds it (:func:`folder_results`), so the other's part is not
    lost when ``--report`` was not given."""
    folder = Path(out_dir)
    return is_report(folder / "report.html") and any((folder / n).is_file() for n in RESULT_FILES if n != own)


def is_report(path: Path) -> bool:
    """Whether the file at ``path`` is a report spectra wrote (it begins with :data:`HTML_HEAD`)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HTML_HEAD.encode())) == HTML_HEAD.encode()
    except OSError:
        return False


def write_report(paths: list[str | os.PathLike[str]], out: str | os.PathLike[str], *, title: str = "spectra report") -> Path:
    """Build the report and write it atomically to ``out``.

    Raises:
        ConfigError: ``out`` is one of the files read (it would replace them), or ends in a path separator.
        OutputError: ``out`` cannot be written (a parent is a file, no permission, a full disk).
    """
    if isinstance(out, str) and out.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        # asks for a folder, but Path() drops the separator: "newdir/" was written as a file named newdir
        raise ConfigError(f"-o {out} names a folder (it ends in {out[-1]}); the report is one HTML file",
                          hint=f"pass -o {os.path.join(out, 'report.html')}")
    refuse_input_as_output(out, input_files(paths))
    refuse_replacing(out, (".html", ".htm"), option="-o", owned=is_report)
    for parent in Path(out).parents:  # checked first: the OS says only "File exists" or "Not a directory"
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "a file, not a folder" if parent.is_file() else "not a folder (a broken link?)"
                raise OutputError(f"cannot write the report: {parent} is {what}", path=out,
                                  hint="choose an --out whose folder is a folder, or move that file")
            break
    text = build_report(paths, title=title)
    try:
        return atomic_write_text(Path(out), text)
    except OutputError as exc:  # its hint speaks of diff --resume; a report is rebuilt by running it again
        raise OutputError(exc.message, path=out, hint="free disk space or fix the folder's permissions, or choose "
                                                      "another --out; the inputs are unchanged") from None


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _overview(found: ReportInputs) -> str:
    """One row per input: what it compared, how many matrices, what was left out, seconds (the run's
    own ``elapsed_s``, the number its command printed) and device."""
    rows = []
    for path, d in found.docs:
        mods = d.get("modules", d.get("matrices"))  # esd.json: "matrices" of one "model"
        config = d.get("config") if isinstance(d.get("config"), dict) else {}
        unmatched = d.get("unmatched") if isinstance(d.get("unmatched"), dict) else {}
        # compare.json also names its base: the columns are A and B there
        first = d["a"] if "a" in d else d.get("base", d.get("model"))
        second = d.get("tuned", d.get("b"))
        skipped = d.get("skipped")
        rows.append([d["schema"].split("/")[0].removeprefix("spectra."), str(path.parent),
                     "(adapter alone)" if first is None and "tuned" in d else first, second,
                     len(mods) if isinstance(mods, list) else None, len(skipped) if isinstance(skipped, list) else None,
                     _count(unmatched.get("base_only", d.get("a_only"))), _count(unmatched.get("tuned_only", d.get("b_only"))),
                     _seconds(d.get("elapsed_s")), d.get("device") or _resolved(config.get("device"))])
    for name, recs in found.train_logs.items():
        rows.append(["train", name, "", "", len(recs), "", "", "", _seconds(recs[-1].get("seconds")) if recs else None, ""])
    return "<h2>Overview</h2>" + table(
        ["kind", "where", "base / A", "tuned / B", "matrices / modules / log records", "skipped", "base-only / A-only",
         "tuned-only / B-only", "seconds", "device"], rows)


def _resolved(device: object) -> object:
    """A configured device that names one; ``"auto"`` (the run's choice, not recorded) names none."""
    return None if device == "auto" else device


def _seconds(x: object) -> str | None:
    """Seconds as the commands print them (one decimal), so that the report and the CLI agree."""
    v = _num(x)
    return None if v is None else f"{v:.1f}"


def _count(x: object) -> int | None:
    return len(x) if isinstance(x, list) else None


def _learning_section(train_logs: dict[str, list[dict]]) -> str:
    logs = {k: v for k, v in train_logs.items() if any(r.get("source_loss") is not None for r in v)}
    out = ["<h2>Learning vs forgetting</h2>"]
    if logs:
        out.append(svg_img(learning_forgetting_plot(logs), alt="learning vs forgetting"))
    rows = [[name, recs[-1].get("step"), recs[0].get("target_loss"), recs[-1].get("target_loss"),
             recs[0].get("source_loss"), recs[-1].get("source_loss")] for name, recs in train_logs.items() if recs]
    out.append(table(["run", "steps", "target loss at start", "at end", "source loss at start", "at end"], rows))
    out.append(note("Lower target loss means the run learned the new domain; higher source loss means it "
                    "forgot the old one. Biderman et al. (2024) found LoRA learns less but forgets less than full "
                    "fine-tuning; each line here goes from a run's start to its end."))
    return "\n".join(out)


# ---- the dispatch: one entry per schema string ------------------------------------------------
#: schema string of a results JSON -> the functions writing its sections, each ``section_html(path, doc) -> str``
#: ("" when it has nothing to show), in order.
SECTIONS: dict[str, tuple[Callable[[Path, dict], str], ...]] = {
    report_diff.SCHEMA: (report_diff.section_html, report_esd.section_html),  # ESD: only with `diff --esd` entries
    report_compare.SCHEMA: (report_compare.section_html,),
    report_esd.SCHEMA: (report_esd.section_html,),
    report_extract.SCHEMA: (report_extract.section_html,),
    report_interfere.SCHEMA: (report_interfere.section_html,),
    report_trace.SCHEMA: (report_trace.section_html,),
}
#: schema string -> its findings for the report's first screen, ``findings(path, doc) -> list[Finding]``
#: (optional: a schema without an entry has no findings block).
FINDINGS: dict[str, Callable[[Path, dict], list[Finding]]] = {
    report_diff.SCHEMA: report_diff.findings,
    report_compare.SCHEMA: report_compare.findings,
    report_esd.SCHEMA: report_esd.findings,
    report_extract.SCHEMA: report_extract.findings,
    report_interfere.SCHEMA: report_interfere.findings,
    report_trace.SCHEMA: report_trace.findings,
}
#: schema string -> how the findings and warnings name an input, ``title(path, doc) -> str`` (optional).
TITLES: dict[str, Callable[[Path, dict], str]] = {
    report_diff.SCHEMA: report_diff.title,
    report_compare.SCHEMA: report_compare.title,
    report_esd.SCHEMA: report_esd.title,
    report_extract.SCHEMA: report_extract.title,
    report_interfere.SCHEMA: report_interfere.title,
    report_trace.SCHEMA: report_trace.title,
}


def _check_esd(path: Path, doc: dict) -> None:
    """An ``esd.json``'s records as ``--resume`` reads them (types, and each flag against its α) and no matrix twice."""
    EsdResult.from_dict(doc, source=path)


#: schema string -> a check of a whole document that its sections' own checks of each record do not make (a
#: matrix listed twice would be counted twice in every median and count), ``check(path, doc)`` (optional).
CHECKS: dict[str, Callable[[Path, dict], None]] = {
    report_esd.SCHEMA: _check_esd,
}
#: JSON-lines file name -> its loader, ``load(path) -> doc`` (a document with a ``schema`` of SECTIONS).
JSONL_LOADERS: dict[str, Callable[[Path], dict]] = {
    "trace.jsonl": report_trace.doc_from_jsonl,
}
