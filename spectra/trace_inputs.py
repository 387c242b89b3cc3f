"""Which checkpoints ``spectra trace`` follows: a run folder of Trainer ``checkpoint-N`` folders or
checkpoints given in order, each with its step, training loss and kind (LoRA adapter or full weights),
read strictly (``trainer_state.json`` through the bounded JSON loader) and opened on demand.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.errors import CheckpointNotFoundError, ConfigError, ResultsFormatError, SpectraError
from spectra.io.adapter import ADAPTER_CONFIG, AdapterConfig, is_adapter
from spectra.io.checkpoint import FOLDER_WEIGHTS, WEIGHT_FILE_SUFFIXES, Checkpoint, open_checkpoint
from spectra.io.jsonfile import load_json, parse_json
from spectra.io.paths import missing_text
from spectra.journal import first_of_each
from spectra.results_check import damaged_hint, impossible, is_int, is_num, trace_rerun  # a step is a JSON integer: true is no step 1, nor "4" or 4.5

#: A Trainer checkpoint folder's name.
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
#: A step in a checkpoint file's name: PyTorch Lightning's default ``epoch=2-step=20.ckpt``.
STEP_IN_NAME = re.compile(r"(?:^|[-_])step=(\d+)(?=[-_.]|$)")


def file_step(path: Path) -> int | None:
    """The step a checkpoint file's name gives (``checkpoint-20.safetensors``, Lightning's ``epoch=1-step=20.ckpt``),
    or None: not a weights file, or no step in its name."""
    if not path.name.endswith((*WEIGHT_FILE_SUFFIXES, ".index.json")):
        return None
    m = CHECKPOINT_DIR.match(path.stem) or STEP_IN_NAME.search(path.name)
    return int(m.group(1)) if m else None


@dataclass
class CheckpointRef:
    """One checkpoint of the trace, in step order.

    Attributes:
        path: the folder or file. step: training step. loss: training loss logged at that step
            (None when the logs have none). kind: ``"lora"`` or ``"full"``. source: where the step
            came from (``"trainer_state"``, ``"folder name"``, ``"file name"``, ``"position"``). note: caveats.
        failed: why it stopped being readable during the run (its later points are skipped).
    """

    path: str
    step: int
    loss: float | None
    kind: str
    source: str
    note: str = ""
    failed: str = ""


def _read_state(folder: Path) -> tuple[dict | None, str]:
    """``trainer_state.json`` of a checkpoint folder (bounded JSON), or None and why. Python's NaN and Infinity
    are read: the Trainer writes them (an fp16 run's infinite ``grad_norm``, a diverged loss), and a strict
    read left out every checkpoint after the first as "still being saved"; non-finite losses are not used."""
    f = folder / "trainer_state.json"
    if not f.is_file():
        return None, "no trainer_state.json"
    try:
        doc = load_json(f, what="trainer_state.json", nonfinite=True)
    except SpectraError as exc:  # half written, or not JSON at all
        return None, exc.message
    return (doc, "") if isinstance(doc, dict) else (None, "trainer_state.json is not a JSON object")


def _is_step(x: object) -> bool:
    """A training step as the Trainer writes it: a whole number >= 0 (a negative one is a hand edit)."""
    return is_int(x) and x >= 0  # type: ignore[operator]


def _no_step(state: dict) -> str:
    """Why a ``trainer_state.json`` that was read gives no step, for a checkpoint's note."""
    if "global_step" not in state:
        return "trainer_state.json has no global_step"
    return f"trainer_state.json's global_step is {json.dumps(state['global_step'])[:40]}, not a step (a whole number >= 0)"


def open_weights(ref_path: str | Path, kind: str | None = None) -> Checkpoint:
    """The checkpoint holding a folder's tensors (an adapter's weights file), headers read and checked
    against the file sizes, so a file still being written fails here.

    Raises:
        SpectraError: missing or truncated files, or no weights in an adapter folder.
    """
    path = Path(ref_path)
    if kind == "lora" or (kind is None and is_adapter(path)):
        weights = next((path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointNotFoundError("adapter folder has no adapter_model.safetensors or adapter_model.bin", path=path)
        return open_checkpoint(weights)
    return open_checkpoint(path)


def weights_identity(ckpt: Checkpoint, path: str | Path) -> frozenset:
    """The files a checkpoint's tensors are read from, as ``(st_dev, st_ino)`` (a resolved path where one cannot be
    stat'ed): one set of weights whatever spelling reached it (a folder or its weights file, a link, ``./``). An
    adapter's config is part of it: the same factors under another ``lora_alpha`` are another update."""
    out: set = set()
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    config = [folder / "adapter_config.json"] if (folder / "adapter_config.json").is_file() else []
    for f in {t.file for t in ckpt.tensors.values()} | set(config) or {Path(path)}:
        try:
            st = Path(f).stat()
            out.add((st.st_dev, st.st_ino))
        except (OSError, ValueError):
            out.add(str(f))
    return frozenset(out)


def _log_history(state: dict | None) -> list[dict[str, Any]]:
    out = []
    history = (state or {}).get("log_history")
    for rec in history if isinstance(history, list) else []:  # (a hand edit: NaN, a number, an object)
        if isinstance(rec, dict) and is_int(rec.get("step")):
            entry = {"step": rec["step"]}
            for key in ("loss", "eval_loss", "learning_rate"):
                if isinstance(rec.get(key), (int, float)) and math.isfinite(rec[key]):
                    entry[key] = float(rec[key])
            if len(entry) > 1:
                out.append(entry)
    return out


def _train_log(folder: Path) -> list[dict[str, Any]]:
    """``spectra train``'s ``train_log.jsonl`` as loss history (train, held-out target, source loss)."""
    f = folder / "train_log.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = parse_json(line.encode("utf-8"), path=f, what="a train_log.jsonl line")
            except SpectraError:
                break  # a line being written
            if isinstance(rec, dict) and is_int(rec.get("step")):
                out.append({"step": rec["step"], **{k: rec[k] for k in ("train_loss", "target_loss", "source_loss")
                                                     if isinstance(rec.get(k), (int, float))}})
                if "train_loss" in out[-1]:
                    out[-1]["loss"] = out[-1]["train_loss"]
    return out


@dataclass
class Discovery:
    """What :func:`find_checkpoints` found: usable checkpoints in step order, those left out with
    the reason, the loss history of the run, and warnings."""

    checkpoints: list[CheckpointRef]
    skipped: list[dict[str, str]]
    loss_history: list[dict[str, Any]]
    run: str | None
    warnings: list[str] = field(default_factory=list)
    #: each checkpoint's own ``log_history`` (by path) and the run folder's ``train_log.jsonl``, oldest first
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    run_log: list[dict[str, Any]] = field(default_factory=list)

    def merged_history(self, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The loss curve: the run log and every checkpoint's history but those of ``exclude`` (checkpoints
        that failed: another model's log is not this run's), a newer checkpoint's record winning at a step."""
        left = set(exclude)
        return _merge([self.run_log, *(h for p, h in self.histories.items() if p not in left)])


def _merge(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    history: dict[int, dict[str, Any]] = {}
    for h in histories:  # later (newer) histories win: they are the most complete
        for rec in h:
            history.setdefault(rec["step"], {}).update(rec)
    return [history[s] for s in sorted(history)]


def _first_clash(refs: list[CheckpointRef], by: dict[str, dict[int, float]]) -> str | None:
    """The first step two checkpoints' histories log different losses at, in words (None: they agree)."""
    first: dict[int, tuple[float, str]] = {}  # step -> the first loss logged there, and by which checkpoint
    for r in refs:  # one pass over every record: a long run's hundred checkpoints hold thousands each
        for s, v in by[r.path].items():
            if s not in first:
                first[s] = (v, r.path)
            elif not math.isclose(first[s][0], v, rel_tol=1e-9):
                return (f"{Path(first[s][1]).name} and {Path(r.path).name} log different training losses at step {s} "
                        f"({first[s][0]:.4g} and {v:.4g}): more than one run wrote into this folder? each "
                        "checkpoint's loss is the one its own trainer_state.json logs")
    return None


def _assign_losses(refs: list[CheckpointRef], own: dict[str, list[dict[str, Any]]], run_log: list[dict[str, Any]],
                   warnings: list[str]) -> None:
    """Each checkpoint's training loss at its step: from its own ``trainer_state.json``, else the run's
    ``train_log.jsonl``, else the newest other checkpoint whose history agrees with its own wherever both
    log a loss (one run). Two histories logging different losses at one step are two runs written into one
    folder (an ``output_dir`` reused): said, and no checkpoint takes the other run's loss."""
    def losses(h: list[dict[str, Any]]) -> dict[int, float]:
        return {rec["step"]: rec["loss"] for rec in h if "loss" in rec}

    by = {r.path: losses(own.get(r.path, [])) for r in refs}
    if clash := _first_clash(refs, by):
        warnings.append(clash)
    log = losses(run_log)
    for r in refs:
        mine = by[r.path]
        loss = mine.get(r.step, log.get(r.step))
        if loss is None:  # the newest other history of the same run (no clash with this checkpoint's own)
            for other in reversed(refs):
                theirs = by[other.path]
                if other is not r and r.step in theirs and all(
                        math.isclose(theirs[s], v, rel_tol=1e-9) for s, v in mine.items() if s in theirs):
                    loss = theirs[r.step]
                    break
        r.loss = loss


def _holds_weights(folder: Path) -> list[Path]:
    """The model files directly in ``folder`` as ``from_pretrained`` looks for them (an adapter config, or
    :data:`~spectra.io.checkpoint.FOLDER_WEIGHTS`; not any ``*.bin``: ``training_args.bin`` is no model),
    or none when the folder cannot be listed."""
    try:
        found = [folder / ADAPTER_CONFIG] if (folder / ADAPTER_CONFIG).is_file() else []
        return found + [folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()]
    except OSError:
        return []


def _run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``checkpoint-N`` folders (a Trainer's output folder) whose own model, if any,
    has no step (a final model with its trainer_state.json's global_step is a checkpoint to list with the others)."""
    try:
        runs = path.is_dir() and any(CHECKPOINT_DIR.match(d.name) and d.is_dir() for d in path.iterdir())
    except OSError:  # unreadable: reading it as a checkpoint says why
        return False
    state, _ = _read_state(path) if runs else (None, "")
    return runs and not (state is not None and _is_step(state.get("global_step")))


def _models_beside_checkpoints(run: Path, found: list[Path]) -> list[dict[str, str]]:
    """Models in a run folder that are not ``checkpoint-N`` folders (Trainer.save_model's final model at the
    run folder itself; ``checkpoint-final``, ``step_0007``, ``epoch-1``), listed as left out with the way
    to trace them: their step is not known the way a checkpoint's is (a model saved at the end may be the
    best checkpoint's weights, load_best_model_at_end, not the last step's), and a run that seemed to end
    at its last checkpoint-N without a word would mislead. A link to a found checkpoint (``last``,
    ``best``) is that checkpoint: not listed."""
    out = []

    def how(folder: Path) -> str:  # a step its trainer_state.json gives is said, not called unknown
        state, _ = _read_state(folder)
        if state is not None and _is_step(state.get("global_step")):
            return (f"step {state['global_step']} read from its trainer_state.json; only checkpoint-<step> folders are "
                    "traced from a run folder: list it with the checkpoints to include it")
        return ("its step is not known; to trace it, name it checkpoint-<step> or give it a trainer_state.json with its "
                "global_step and list it with the checkpoints")

    if (files := _holds_weights(run)):
        out.append({"path": str(files[0]), "reason": f"the run folder's own model ({', '.join(f.name for f in files[:2])}), "
                                                    f"not a checkpoint-N folder: {how(run)}"})
    try:
        entries = sorted(run.iterdir())
        known = {d.resolve() for d in found}
    except (OSError, RuntimeError):  # RuntimeError: pathlib's resolve() on a link loop (Python < 3.13)
        return out
    for d in entries:
        try:
            if d.is_file() and (step := file_step(d)) is not None:  # checkpoint-20.safetensors: no folder, still a step
                out.append({"path": str(d), "reason": f"a checkpoint file (step {step} by its name), not a checkpoint-N folder: "
                                                      "list it with the checkpoints to trace it"})
            elif (d.is_dir() and not CHECKPOINT_DIR.match(d.name) and not d.name.startswith(".")
                    and d.resolve() not in known and _holds_weights(d)):
                out.append({"path": str(d), "reason": f"a model folder not named checkpoint-N: {how(d)}"})
        except (OSError, RuntimeError):  # a link loop or a folder that cannot be read: not a model spectra can name
            continue
    return out


def _once(refs: list[CheckpointRef], idents: list[tuple[frozenset, bool, int]],
          skipped: list[dict[str, str]]) -> list[CheckpointRef]:
    """A run folder's checkpoints with each set of weight files once (``ln -s checkpoint-20 checkpoint-30`` is no third
    step): of those read from the same files the real folder is kept (not a link; else the one whose name is its step;
    else the first by name), the others left out with the reason naming it, as a link such as ``last`` is not traced."""
    groups: dict[frozenset, list[int]] = {}
    for j, (ident, _link, _n) in enumerate(idents):
        groups.setdefault(ident, []).append(j)
    keep = {min(js, key=lambda j: (idents[j][1], idents[j][2] != refs[j].step, j)) for js in groups.values()}
    for js in groups.values():
        kept = next(j for j in js if j in keep)
        for j in js:
            if j != kept:
                how = "a link to it" if idents[j][1] else "the same weight files"
                skipped.append({"path": refs[j].path, "reason": f"the same checkpoint as {Path(refs[kept].path).name} "
                                                                f"({how}): traced once, as {Path(refs[kept].path).name}"})
    return [r for j, r in enumerate(refs) if j in keep]


def _is_dora(path: str) -> bool:
    """Whether the adapter at ``path`` is a DoRA one, from its config alone (the factors are read once, when traced);
    False when it cannot be read: that is said where it is used."""
    try:
        return bool(AdapterConfig.from_file(Path(path) / ADAPTER_CONFIG).use_dora)
    except (SpectraError, OSError):
        return False


def find_checkpoints(paths: list[str]) -> Discovery:
    """The checkpoints to trace: ``[RUN_DIR]`` (its ``checkpoint-N`` folders) or a list of checkpoints.

    In a run folder a checkpoint that cannot be read (missing or truncated weights) is left out with
    the reason, and so is the newest one when it has no ``trainer_state.json`` yet (the Trainer
    writes that file last, so the checkpoint is probably still being saved); models beside the
    ``checkpoint-N`` folders (the run folder's own, ``checkpoint-final``) are listed as left out. Listed checkpoints must
    all be readable. Steps come from ``trainer_state.json`` (``global_step``), else from a
    ``checkpoint-N`` name, else from a file name's ``step=N`` (PyTorch Lightning's), else from the position in the
    list; losses from the ``log_history``
    (and ``train_log.jsonl`` of ``spectra train``).

    Raises:
        CheckpointNotFoundError: a path does not exist, or a run folder holds no checkpoint-N folder.
        SpectraError: a listed checkpoint cannot be read; no checkpoint is usable; adapters and full
            checkpoints are mixed.
    """
    skipped: list[dict[str, str]] = []
    warnings: list[str] = []
    run = None
    if not paths:  # (the command line needs one; the library raised an IndexError)
        raise ConfigError("no checkpoint given", hint="pass a run folder with checkpoint-N folders, or checkpoints in order")
    for p in paths:
        if not Path(p).exists():
            raise CheckpointNotFoundError(missing_text(p), path=p)
    single = Path(paths[0])
    if len(paths) == 1 and not single.is_dir():  # one weights file: a trace of one point (of the base, given the base's)
        raise ConfigError("one checkpoint is not a trace", path=single,
                          hint="pass a run folder with checkpoint-N folders, or two or more checkpoints in order")
    # a checkpoint-N link to nothing, or a file or FIFO of that name, counts too: listed as skipped with why, never dropped unsaid
    found = sorted(((int(m.group(1)), d) for d in single.iterdir() if (m := CHECKPOINT_DIR.match(d.name))),
                   key=lambda x: (x[0], x[1].name)) if len(paths) == 1 and single.is_dir() else []
    if len(paths) == 1 and single.is_dir() and not found:
        stepped = sorted((file_step(f), f.name) for f in single.iterdir() if f.is_file() and file_step(f) is not None)
        if len(stepped) > 1:  # checkpoint-5.safetensors, checkpoint-10.safetensors: a run saved as files, not one model
            raise ConfigError(f"a folder of checkpoint files ({', '.join(n for _, n in stepped[:3])}{' …' * (len(stepped) > 3)}), "
                              "not a run folder of checkpoint-N folders", path=single,
                              hint="list them, traced in the order of the steps in their names: "
                                   f"spectra trace BASE {shlex.quote(str(single))}/*{Path(stepped[0][1]).suffix}")
        if (single / ADAPTER_CONFIG).is_file() or any(single.glob("*.safetensors")) or any(single.glob("*.bin")):
            # a `spectra train` folder holds its run's trace already (trace.jsonl), and no checkpoints
            held = (f"; its trace.jsonl (spectra train --trace-every) is shown by spectra report {shlex.quote(str(single))}"
                    if (single / "trace.jsonl").is_file() else "")
            raise ConfigError("one checkpoint is not a trace", path=single,
                              hint=f"pass a run folder with checkpoint-N folders, or two or more checkpoints in order{held}")
        raise CheckpointNotFoundError("no checkpoint-N folders in this run folder", path=single,
                                      hint="the Trainer writes them with save_strategy='steps' (or 'epoch'); "
                                           "or pass the checkpoints themselves in order")
    refs: list[CheckpointRef] = []
    own: dict[str, list[dict[str, Any]]] = {}  # each checkpoint's log_history, oldest checkpoint first
    run_log: list[dict[str, Any]] = []
    if found:
        run = str(single)
        run_log = _train_log(single)
        # the newest checkpoint without trainer_state.json is taken for one still being saved only when its
        # elder ones have theirs (a folder of copied model files has none anywhere: nothing is being saved)
        elders_have_state = len(found) == 1 or any((folder / "trainer_state.json").is_file() for _, folder in found[:-1])
        idents: list[tuple[frozenset, bool, int]] = []  # each ref's weight files, whether a link, its name's step
        for i, (n, folder) in enumerate(found):
            newest = i == len(found) - 1
            if not folder.is_dir():
                skipped.append({"path": str(folder), "reason": missing_text(folder, "not a folder (a Trainer checkpoint is one)")})
                continue
            state, why = _read_state(folder)
            note = ""
            if state is None:
                if newest and elders_have_state:
                    skipped.append({"path": str(folder), "reason": f"{why}: the Trainer writes it last, so this newest "
                                                                   "checkpoint is probably still being saved; trace it later"})
                    continue
                note = f"{why}: step from the folder name"
            try:
                ident = weights_identity(open_weights(folder), folder)
                kind = "lora" if is_adapter(folder) else "full"
            except SpectraError as exc:  # which shard, when it is one file of several
                where = f"{Path(exc.path).name}: " if exc.path and Path(exc.path) != folder else ""
                skipped.append({"path": str(folder), "reason": f"cannot be read ({where}{exc.message})"})
                continue
            step, source = n, "folder name"
            if state is not None and _is_step(state.get("global_step")):  # as for listed checkpoints
                step, source = state["global_step"], "trainer_state"
                if step != n:
                    note = f"the folder name says step {n}; trainer_state.json's global_step {step} is used"
            elif state is not None:
                note = f"{_no_step(state)}: step from the folder name"
            own[str(folder)] = _log_history(state)
            refs.append(CheckpointRef(str(folder), step, None, kind, source, note))
            idents.append((ident, folder.is_symlink(), n))
        refs = _once(refs, idents, skipped)  # (a dropped link's name is no step of the run: no warning about it)
        own = {r.path: own[r.path] for r in refs}
        warnings += [f"{Path(r.path).name}: {r.note}" for r in refs if r.source == "trainer_state" and r.note]
        skipped += _models_beside_checkpoints(single, [d for _, d in found])
    else:
        seen: dict[frozenset, str] = {}
        for i, p in enumerate(paths):
            path = Path(p)
            if _run_folder(path):
                # (read as a model, a loose weights file in it would give a step-less point of another kind)
                raise ConfigError("this is a training run's folder of checkpoint-N folders, listed with other checkpoints",
                                  path=path, hint=f"list its checkpoints with the others, or trace one run at a time: "
                                                  f"spectra trace BASE {shlex.quote(p)}")
            # a listed checkpoint must be readable: errors propagate as one line
            ident = weights_identity(open_weights(path), path)
            if ident in seen:  # any spelling, link, or a folder and its weights file: a step that did not happen, a turn of 0
                raise ConfigError(f"{p} is listed twice (also as {seen[ident]}: the same weight files)",
                                  hint="list each checkpoint once")
            seen[ident] = str(p)
            kind = "lora" if is_adapter(path) else "full"
            folder = path if path.is_dir() else path.parent
            state, _ = _read_state(folder)
            m = CHECKPOINT_DIR.match(folder.name)
            named = file_step(path) if not path.is_dir() else None
            if state is not None and _is_step(state.get("global_step")):
                step, source = state["global_step"], "trainer_state"
            elif m:
                step, source = int(m.group(1)), "folder name"
            elif named is not None:  # Lightning's epoch=9-step=90.ckpt: a shell glob lists step=100 before step=20
                step, source = named, "file name"
            else:
                step, source = i + 1, "position"
            how = {"folder name": "step from the folder name", "file name": "step from the file name",
                   "position": "step from the position in the list"}.get(source, "")
            note = (f"{_no_step(state)}: {how}" if how and state is not None  # read, yet no step in it: said
                    else "step from the position in the list" if source == "position" else "")
            own[str(p)] = _log_history(state)
            refs.append(CheckpointRef(str(p), step, None, kind, source, note))
        placed = [r for r in refs if r.source == "position"]
        if placed and len(placed) < len(refs):  # a position is no step: sorted among real steps it would mislead
            raise ConfigError(f"{len(placed)} of the {len(refs)} checkpoints have no step (no global_step in a trainer_state.json, no "
                              f"checkpoint-N or step=N name: {', '.join(Path(r.path).name for r in placed[:3])}) while the others have one",
                              hint="give every checkpoint its step (its trainer_state.json, or a checkpoint-N folder name), "
                                   "or none (they are then traced in the order given)")
    order = sorted(range(len(refs)), key=lambda j: refs[j].step)
    if order != list(range(len(refs))):
        warnings.append("the checkpoints were given out of step order; they are traced in step order" if not found else
                        "the checkpoint folders' names are out of their global_step order; they are traced in step order")
    refs = [refs[j] for j in order]
    if len({r.step for r in refs}) != len(refs):  # (a run folder's by name: its listing's order is the filesystem's)
        same = [r for r in refs if sum(s.step == r.step for s in refs) > 1]
        warnings.append(f"{', '.join(Path(r.path).name for r in same[:4])}{' …' if len(same) > 4 else ''} have the same step; "
                        f"they are traced in {'the order of their folder names' if found else 'the order given'}, and a turn "
                        "between two of them is not a step of training")
    if not refs:
        raise SpectraError("no checkpoint can be traced", path=run or ", ".join(paths),
                           hint="; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in skipped)[:400] or None)
    kinds = {r.kind for r in refs}
    if len(kinds) > 1:
        raise ConfigError("the checkpoints mix PEFT adapters and full models", path=run or ", ".join(paths),
                          hint="trace the adapters and the full checkpoints separately")
    for r in refs:  # one DoRA checkpoint among LoRA ones was a failed last point, exit 0: refused as an all-DoRA run is
        if r.kind == "lora" and _is_dora(r.path):
            raise ConfigError("DoRA adapters are not traced: their update needs the base weights at every checkpoint",
                              path=r.path, hint="trace merged checkpoints instead (merge_and_unload)")
    _assign_losses(refs, own, run_log, warnings)
    found_ = Discovery(refs, skipped, [], run, warnings, own, run_log)
    found_.loss_history = found_.merged_history()
    return found_


def moved(pt: dict[str, Any]) -> bool:
    """Whether a trace point (one matrix at one checkpoint) is an update there is: measured, not skipped,
    and ΔW ≠ 0. The medians of trace's table, findings, figures and warnings are over these, as diff's
    statements are over the matrices that changed: a frozen layer's zero says nothing of how the update grew."""
    return isinstance(pt, dict) and "skip" not in pt and bool(pt.get("fro_norm"))


def check_trace_point(pt: Any, at: str, source: Any) -> None:
    """Refuse a trace point (one matrix at one checkpoint, as ``trace.json`` and the journal hold it)
    whose keys have other types than spectra writes: ``step`` an integer or null, every other value a
    number, text, null, or arrays and objects of numbers (``energy_rank``, ``singular_values``,
    ``turn_prev``). A figure or report would otherwise
    fail on it, or show it.

    Raises:
        ResultsFormatError: one line naming ``source``, the record and the key.
    """
    def num(v: Any) -> bool:
        return v is None or is_num(v)

    if not isinstance(pt, dict):
        raise ResultsFormatError(f"{at} must be an object. Got {str(pt)[:60]!r} instead", path=source)
    step = pt.get("step")
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool)):
        raise ResultsFormatError(f"{at}.step must be an integer or null. Got {str(step)[:60]!r} instead", path=source,
                                 hint=damaged_hint(source))
    def numbers(v: Any, depth: int = 0) -> bool:  # a number or null, or arrays / objects of them (turn_prev nests)
        if isinstance(v, (list, dict)):
            return depth < 4 and all(numbers(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        return num(v)

    for key, v in pt.items():
        if not (isinstance(v, str) or numbers(v)):
            raise ResultsFormatError(f"{at}.{key} must be a number, text, or arrays and objects of numbers. Got "
                                     f"{str(v)[:60]!r} instead", path=source,
                                     hint=damaged_hint(source))


def _check_point_values(pt: dict[str, Any], p: int, at: str, source: Any) -> None:
    """Refuse values no ΔW of a matrix with ``p = min(shape)`` can have (an edited ``trace.json``): ranks outside 0..p,
    negative norms, σ₁ above ‖ΔW‖_F, σ₁/σ₂ below 1, singular values not descending, φ outside [0, 1], angles
    outside [0°, 90°]. ``pt`` has passed :func:`check_trace_point`."""
    def no(key: str, v: Any, why: str) -> None:
        impossible(f"{at}.{key}", v, why, source, rerun=trace_rerun(source))

    for k, v in (pt.get("energy_rank") or {}).items() if isinstance(pt.get("energy_rank"), dict) else ():
        if is_num(v) and not 0 <= v <= p:
            no(f"energy_rank[{k}]", v, f"a rank lies from 0 to min(shape) = {p}")
    for key in ("fro_norm", "spectral_norm", "rel_norm", "stable_rank", "effective_rank"):
        if is_num(v := pt.get(key)) and not v >= 0:
            no(key, v, "norms and ranks are not negative")
    for key in ("stable_rank", "effective_rank"):  # ‖ΔW‖_F²/σ₁² and exp(entropy) are at most p
        if is_num(v := pt.get(key)) and v > p * (1 + 1e-9):
            no(key, v, f"it is at most min(shape) = {p}")
    fro, top = pt.get("fro_norm"), pt.get("spectral_norm")
    if is_num(fro) and is_num(top) and top > fro * (1 + 1e-3) + 1e-300:
        no("spectral_norm", top, f"σ₁ is at most ‖ΔW‖_F ({fro})")
    if is_num(v := pt.get("sigma_ratio")) and not v >= 1 - 1e-12:
        no("sigma_ratio", v, "σ₁/σ₂ is at least 1")
    values = pt.get("singular_values")
    if isinstance(values, list) and values and all(is_num(x) for x in values) and (
            len(values) > p or min(values) < 0 or any(b > a for a, b in zip(values, values[1:]))):
        no("singular_values", "…", f"at most min(shape) = {p} values, not negative, largest first")
    for turn in ("turn_prev", "turn_first"):
        sides = pt.get(turn) if isinstance(pt.get(turn), dict) else {}
        for side, t in sides.items():
            t = t if isinstance(t, dict) else {}
            if is_num(v := t.get("phi")) and not 0 <= v <= 1 + 1e-9:
                no(f"{turn}.{side}.phi", v, "φ lies from 0 (orthogonal) to 1 (unturned)")
            if is_num(v := t.get("max_angle_deg")) and not 0 <= v <= 90 + 1e-9:
                no(f"{turn}.{side}.max_angle_deg", v, "a principal angle lies from 0° to 90°")
            for key in ("k", "k_before", "k_now"):
                if is_num(v := t.get(key)) and not 0 <= v <= p:
                    no(f"{turn}.{side}.{key}", v, f"a subspace of ΔW has from 0 to min(shape) = {p} directions")


def check_trace_steps(checkpoints: Any, matrices: list, source: Any, *, aligned: bool) -> None:
    """Refuse a trace whose checkpoints are not in step order (each an object with an integer ``step`` and a number or
    null ``loss``), or, with ``aligned`` (``spectra trace``'s own document: one point per checkpoint and matrix), a
    matrix with another number of points, or a point whose ``step`` is not its checkpoint's: the findings label each
    point by its checkpoint's step ("from step 30 to step 10" read a reversed list).

    Raises:
        ResultsFormatError: one line naming ``source`` and the field.
    """
    steps = []
    for i, ck in enumerate(checkpoints):
        if not (isinstance(ck, dict) and is_int(ck.get("step")) and ck["step"] >= 0):
            impossible(f"checkpoints[{i}].step", ck.get("step") if isinstance(ck, dict) else ck, "a step is a whole number >= 0",
                       source, rerun="spectra trace --out")
        loss = ck.get("loss")
        if loss is not None and not is_num(loss):
            impossible(f"checkpoints[{i}].loss", loss, "a loss is a number or null", source, rerun="spectra trace --out")
        if steps and ck["step"] < steps[-1]:
            impossible(f"checkpoints[{i}].step", ck["step"], f"checkpoints are listed in step order (the one before is at "
                                                             f"step {steps[-1]})", source, rerun="spectra trace --out")
        steps.append(ck["step"])
    if not aligned:
        return
    for i, m in enumerate(matrices):
        pts = m["points"]
        if len(pts) != len(steps):
            impossible(f"matrices[{i}].points", f"{len(pts)} points", f"one per checkpoint: {len(steps)}", source,
                       rerun="spectra trace --out")
        for j, pt in enumerate(pts):
            if is_int(pt.get("step")) and pt["step"] != steps[j]:
                impossible(f"matrices[{i}].points[{j}].step", pt["step"], f"its checkpoint is at step {steps[j]}", source,
                           rerun="spectra trace --out")


def check_trace_matrix(m: Any, at: str, source: Any, *, ratios: bool = True) -> None:
    """Refuse a ``trace.json`` matrix record without a string name and module, or with a point that
    :func:`check_trace_point` refuses; with ``ratios``, also a point whose ``rel_norm`` is not its ``fro_norm`` over the
    record's ``base_fro_norm`` (not for a tracker's ``trace.jsonl``: a resumed run measures from the weights it
    resumed, each line with its own base norm)."""
    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("module"), str)
            and isinstance(m.get("points"), list)):
        raise ResultsFormatError(f"{at} must be an object with a string name and module and a list of points", path=source,
                                 hint=damaged_hint(source))
    base = m.get("base_fro_norm")
    shape = m.get("shape")
    p = min(shape) if isinstance(shape, list) and len(shape) == 2 and all(is_int(x) and x > 0 for x in shape) else None
    for j, pt in enumerate(m["points"]):
        check_trace_point(pt, f"{at}.points[{j}]", source)
        if p is not None and isinstance(pt, dict):
            _check_point_values(pt, p, f"{at}.points[{j}]", source)
        fro, rel = pt.get("fro_norm"), pt.get("rel_norm")
        # one number twice (‖ΔW‖ / ‖W_base‖): an edited rel_norm moved the findings' median, as diff's results_check refuses
        if ratios and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (base, fro, rel)) and base > 0 and \
                not math.isclose(rel, fro / base, rel_tol=1e-6, abs_tol=1e-300):
            raise ResultsFormatError(f"{at}.points[{j}].rel_norm is {rel:.6g}, but fro_norm / base_fro_norm is {fro / base:.6g}",
                                     path=source, hint=damaged_hint(source))


def check_earlier_points(m: dict[str, Any], caveats: Any, refs: list[CheckpointRef], at: str, source: Any) -> None:
    """Refuse a full trace's journal record (matrix ``m``, checked by :func:`check_trace_matrix`, and the ``caveats``
    of its points, ``[[step, message], …]``) that cannot be the start of this run's matrix: more points than
    checkpoints, or points at other steps than the checkpoints' (a resumed run keeps them and adds the rest).

    Raises:
        ResultsFormatError: one line naming ``source`` and the record.
    """
    hint = "the journal was edited: run without --resume into a new folder"
    steps = [pt.get("step") for pt in m["points"]]
    if steps != [r.step for r in refs[:len(steps)]] or len(steps) > len(refs):
        raise ResultsFormatError(f"{at}: its points are at steps {str(steps)[:80]}, not the checkpoints' "
                                 f"{str([r.step for r in refs])[:80]}", path=source, hint=hint)
    if not (isinstance(m.get("shape"), list) and len(m["shape"]) == 2 and all(is_int(x) for x in m["shape"])):
        raise ResultsFormatError(f"{at}: shape must be two integers. Got {str(m.get('shape'))[:60]!r} instead", path=source, hint=hint)
    if not (isinstance(caveats, list) and all(isinstance(c, list) and len(c) == 2 and (c[0] is None or is_int(c[0]))
                                              and isinstance(c[1], str) for c in caveats)):
        raise ResultsFormatError(f"{at}: caveats must be [[step, message], …]. Got {str(caveats)[:60]!r} instead",
                                 path=source, hint=hint)


def first_trace_records(records: list, warnings: list[str] | None = None) -> list:
    """A trace's records less each repeated one (:func:`spectra.journal.first_of_each`, the first kept), with
    one warning saying how many: into ``warnings`` for a ``spectra trace`` journal; with None (the lines of a
    ``trace.jsonl`` of :class:`spectra.callbacks.SpectraTracker`), as a ``{"warning": …}`` record appended, as
    the file's own warnings are. Without this a repeated line lists a matrix twice (a journal), or silently
    replaces a point by its repeat (a ``trace.jsonl``: the last line of a (matrix, step) was kept)."""
    said: list[str] = []
    kept = first_of_each(records, _trace_record_key, said, held="the journal" if warnings is not None else "trace.jsonl",
                         of="a matrix or checkpoint" if warnings is not None else "a matrix at a step")
    if warnings is not None:
        warnings += said
        return kept
    return kept + [{"warning": w} for w in said]


def _trace_record_key(rec: object) -> tuple | None:
    """What one record is of. ``spectra trace``'s journal: ``{"matrix": …}``, one matrix at every checkpoint
    (a full trace; again, with more points, when a resumed run traces checkpoints saved since); ``{"checkpoint": i,
    …}``, every module at one checkpoint (an adapter trace); ``{"failed":
    {"index": i, …}}``, one checkpoint's failure. A ``trace.jsonl`` line ``{"step", "matrix", "point"}``: one
    matrix at one step (steps only increase, and a resumed training drops the lines after its checkpoint).
    Each is written once, so a second record of the same one is a repeated line; None for any other shape
    (header, log, warning lines; malformed records, which the run's checks refuse)."""
    def index(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(rec, dict):
        return None
    matrix, failed, step = rec.get("matrix"), rec.get("failed"), rec.get("step")
    name = matrix.get("name") if isinstance(matrix, dict) else None
    if "point" in rec:
        ok = isinstance(name, str) and isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
        return ("point", name, int(step)) if ok else None
    if isinstance(name, str):  # (a run resumed with checkpoints appended adds the matrix again with more points)
        return ("matrix", name, len(matrix["points"]) if isinstance(matrix.get("points"), list) else None)
    if index(rec.get("checkpoint")):
        return ("checkpoint", rec["checkpoint"])
    if isinstance(failed, dict) and index(failed.get("index")):
        return ("failed", failed["index"])
    return None


def refuse_empty_plan(base: Checkpoint, refs: list[CheckpointRef], include: str | None, exclude: str | None,
                      layers: str | None) -> None:
    """Refuse filters that leave no matrix to trace, before the run's journal is written: a journal left
    by a refused run would read as a run to finish with --resume, which fails alike. A full run's matrices
    are base tensors; an adapter run's the modules its first checkpoint updates (a head tied to the
    embedding keeps its own name). What cannot be read here is left to the run, which says it.

    Raises:
        ConfigError: :func:`spectra.selection.refuse_empty_selection`'s.
    """
    from spectra.adapter_diff import adapter_updates, saved_skips  # the adapter readers only for this check
    from spectra.pairing import Skipped
    from spectra.param_experts import open_adapter_on
    from spectra.selection import refuse_empty_selection, selector

    keep = selector(include, exclude, layers)
    skipped: list[Skipped] = []  # what the first adapter stores whole: a filter keeping only those is told so
    if refs[0].kind == "lora":
        try:
            adapter = open_adapter_on(refs[0].path, base, check_copies=False)
            specs = [spec for _mod, spec, _base in adapter_updates(adapter, base)]
            skipped = [Skipped(name, why) for name, why, _layer in saved_skips(adapter, base)]
        except (SpectraError, OSError):
            return
        what = "modules the first adapter updates"
    else:
        specs = [spec for name, spec in base.specs.items() if len(base.tensors[name].shape) >= 2]
        what = "matrices of the base"
    if specs and not any(keep(spec.name, spec.layer) for spec in specs):
        names = sorted(spec.name for spec in specs)
        refuse_empty_selection(len(names), names[0], include=include, exclude=exclude, layers=layers, what=what, skipped=skipped)
