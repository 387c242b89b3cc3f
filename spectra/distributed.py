"""Running one diff on several processes with torch.distributed (launched by ``torchrun``).

spectra does not start processes or find peers itself: ``torchrun`` (or any launcher that sets the
standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables) does, on one node or
many, and :func:`init` joins the process group it describes: NCCL when the ranks compute on
CUDA, gloo on CPUs. What we exchange is small (each result is a few hundred numbers), so results
travel as Python objects (``all_gather_object``) between processes of this same run.

How :mod:`spectra.pipeline` uses it: every rank opens the checkpoints and plans the same work; the
tensor pairs are split by estimated cost (:func:`spectra.plan.balance`), each rank reads and
decomposes only its own, and after each of a fixed number of rounds all ranks exchange what they
finished, in a background thread (:class:`Exchanger`). Rank 0 journals every result as it arrives,
so a run that loses a rank keeps whatever was exchanged and ``--resume`` completes it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spectra.errors import ConfigError, DistributedError

#: Seconds a rank waits for the others at an exchange before the run fails (``SPECTRA_DIST_TIMEOUT``
#: overrides it). With gloo a rank that dies closes its connections and fails the others at once;
#: the timeout bounds a rank that hangs, and a dead rank under NCCL.
DEFAULT_TIMEOUT_S = 1800.0


def _env_int(name: str, default: int) -> int:
    """An integer launcher variable; a malformed one is a one-line :class:`ConfigError`."""
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer",
                          hint="start the run with torchrun, which sets it") from None


def world_size() -> int:
    """``WORLD_SIZE`` set by the launcher, else 1.

    Raises:
        ConfigError: ``WORLD_SIZE`` is set but is not a positive integer (a launcher never sets that:
            a stale or mistyped variable, which a run must not read as "one process").
    """
    n = _env_int("WORLD_SIZE", 1)
    if n < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a positive integer",
                          hint="start the run with torchrun, which sets it, or unset WORLD_SIZE")
    return n


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        rank: global rank, 0 … world_size − 1; rank 0 writes the outputs.
        world_size: number of processes.
        local_rank: rank on this node (picks ``cuda:local_rank``).
        backend: ``"gloo"`` or ``"nccl"``.
        owns_group: True when :func:`init` created the process group (and :func:`close` ends it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owns_group: bool


def is_lead() -> bool:
    """True for rank 0 of a launched run, or a process that is not one of several ranks (the one that
    writes outputs and prints).

    Raises:
        ConfigError: ``RANK`` is set but is not an integer.
    """
    return not launched() or _env_int("RANK", 0) == 0  # a RANK left over from elsewhere makes no rank of one process


def launched() -> bool:
    """True when a launcher such as ``torchrun`` started this process as one of several ranks."""
    try:
        return world_size() > 1
    except ConfigError:
        return False


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when the run asked for CUDA without an
    index (one GPU per rank), else ``device`` unchanged.

    Raises:
        ConfigError: an explicit ``cuda:N`` while several ranks share a node (they would all use one
            GPU), or ``LOCAL_RANK`` beyond this node's GPUs.
    """
    if device.type != "cuda":
        return device
    local_ranks = _env_int("LOCAL_WORLD_SIZE", 1)
    if device.index is not None:
        if local_ranks > 1:
            raise ConfigError(f"--device {device} would put all {local_ranks} ranks of this node on one GPU",
                              hint="pass --device cuda (or auto): each rank then takes cuda:LOCAL_RANK")
        return device
    local = _env_int("LOCAL_RANK", 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local >= count:
        raise ConfigError(f"rank with LOCAL_RANK={local} has no GPU: this node has {count}",
                          hint=f"start at most {count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device("cuda", local)


def init(device: torch.device, timeout_s: float | None = None) -> DistContext:
    """Join the process group described by the launcher's environment (``env://``).

    Args:
        device: the compute device of this rank (after :func:`rank_device`); CUDA selects NCCL.
        timeout_s: how long an exchange may wait for the other ranks; default
            ``SPECTRA_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ConfigError: not started by a launcher (no ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``).
        DistributedError: the rendezvous failed.
    """
    if dist.is_available() and dist.is_initialized():  # the caller's group (e.g. inside a training job)
        return _context(owns_group=False)
    missing = [v for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing or not dist.is_available():
        # a WORLD_SIZE above 1 alone starts a distributed run: say where it came from (a stale export)
        why = (f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set in the environment, which runs one rank of a distributed diff, "
               if "WORLD_SIZE" in os.environ else "--distributed needs a launcher: ")
        raise ConfigError(f"{why}but {', '.join(missing) or 'torch.distributed'} {'is' if len(missing) < 2 else 'are'} not set",
                          hint="unset WORLD_SIZE for a single-process run, or start it with `torchrun --nproc-per-node N -m "
                               "spectra diff ...`")
    rank, size = _env_int("RANK", 0), world_size()
    if not 0 <= rank < size:  # the rendezvous would wait out its timeout for ranks that never come
        raise ConfigError(f"RANK={rank} is not a rank of WORLD_SIZE={size}", hint="unset the stale launcher variables or fix them")
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get("SPECTRA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        except ValueError:
            timeout_s = math.nan
        # nan, inf, 1e400 or 0 would reach timedelta or the rendezvous and be blamed on the network
        if not (math.isfinite(timeout_s) and 0 < timeout_s <= 10**8):
            raise ConfigError(f"SPECTRA_DIST_TIMEOUT={os.environ['SPECTRA_DIST_TIMEOUT']!r} is not a positive, finite number of "
                              "seconds", hint=f"unset it for the default ({DEFAULT_TIMEOUT_S:g} s) or give e.g. 3600")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous errors come as many types; report them as one line
        raise DistributedError(f"could not join the distributed run ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                               hint="check MASTER_ADDR/MASTER_PORT and that every node runs the same torchrun command") from exc
    return _context(owns_group=True)


def _context(owns_group: bool) -> DistContext:
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), str(dist.get_backend()), owns_group)


def exchange(ctx: DistContext, obj: Any, *, where: str, journaled: bool = True) -> list[Any]:
    """All ranks' ``obj`` (a list indexed by rank), after every rank has called this; ``journaled``: whether rank 0
    journals results by now (the hint of a failure then says ``--resume``).

    Raises:
        DistributedError: a rank died, was killed or timed out (``where`` says what was being done).
    """
    out: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError when a peer is gone
        raise DistributedError(
            f"rank {ctx.rank}: another rank of the distributed run failed or was killed while {where} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'connection lost'})",
            hint="results exchanged so far are journaled by rank 0; rerun the same command with --resume to finish" if journaled
            else "see that rank's error; nothing was written yet: run the same command again",
        ) from exc
    return out


def broadcast(ctx: DistContext, obj: Any, *, where: str) -> Any:
    """Rank 0's ``obj`` on every rank.

    Raises:
        DistributedError: rank 0 died or timed out (``where`` says what was being done).
    """
    box = [obj if ctx.rank == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as exc:
        who = "another rank" if ctx.rank == 0 else "rank 0 (or another rank)"
        raise DistributedError(f"rank {ctx.rank}: {who} failed or was killed while {where}",
                               hint="see that rank's error; rerun the same command (with --resume if results were "
                                    "journaled)") from exc
    return box[0]


def close(ctx: DistContext | None) -> None:
    """Leave the process group if :func:`init` created it."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class Exchanger:
    """Runs a fixed number of :func:`exchange` rounds in a background thread, so that a rank keeps
    computing while the others catch up (a blocking exchange would make every rank wait for the
    slowest at each round).

    The caller :meth:`send` s one list per round, in order, exactly ``rounds`` times, and collects
    what the other ranks sent with :meth:`receive`. Only this thread issues collectives, so their
    order is the same on every rank.

    Args:
        ctx: the run's :class:`DistContext`.
        rounds: number of rounds, the same on every rank.
        device: this rank's compute device (NCCL needs it current in the exchanging thread).
    """

    def __init__(self, ctx: DistContext, rounds: int, device: torch.device, *, journaled: bool = True) -> None:
        import queue
        import threading

        self.ctx, self.rounds, self.device, self.journaled = ctx, rounds, device, journaled  # journaled: see exchange
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self.received = 0  # rounds whose results were handed out by receive()
        # a daemon: if this rank stops on an error, a thread waiting for its peers must not keep it alive
        self._thread = threading.Thread(target=self._run, name="spectra-exchange", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.ctx.backend == "nccl":
                torch.cuda.set_device(self.device)
            for k in range(self.rounds):
                items = self._out.get()
                self._in.put(exchange(self.ctx, items, where=f"exchanging results (round {k + 1} of {self.rounds})",
                                      journaled=self.journaled))
        except BaseException as exc:  # handed to the main thread, which raises it
            self._in.put(exc)

    def send(self, items: list) -> None:
        """This rank's results of the next round."""
        self._out.put(items)

    def receive(self, *, wait: bool = False) -> list:
        """The other ranks' items from the rounds finished so far (with ``wait``, from every round).

        Raises:
            DistributedError: a round failed (a rank died, was killed or timed out).
        """
        import queue

        items: list = []
        while self.received < self.rounds:
            try:
                got = self._in.get(block=wait)
            except queue.Empty:
                break
            if isinstance(got, BaseException):
                self.received = self.rounds  # nothing more will come
                raise got
            self.received += 1
            for rank, theirs in enumerate(got):
                if rank != self.ctx.rank:
                    items.extend(theirs)
        return items
