"""Running one diff on several processes with torch.distributed (launched by ``torchrun``).

spectra does not start processes or find peers itself: ``torchrun`` (or any launcher that sets the
standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables) does, on one node or
many, and :func:`init` joins the process group it describes: NCCL when the ranks compute on
CUDA, gloo on CPUs. What we exchange is small (each result is a few hundred numbers), so results
travel as Python objects (``all_gather_object``) between processes of this same run.

How :mod:`spectra.diff` uses it: every rank opens the checkpoints and plans the same work; the
tensor pairs are split by estimated cost (:func:`spectra.plan.balance`), each rank reads and
decomposes only its own, and after each of a fixed number of rounds all ranks exchange what they
finished. Rank 0 journals every result as it arrives, so a run that loses a rank keeps whatever
was exchanged and ``--resume`` completes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spectra.errors import ConfigError, SpectraError

#: Seconds a rank waits for the others at an exchange before the run fails. A rank that dies
#: closes its connections and fails the others at once; this bounds a rank that hangs.
DEFAULT_TIMEOUT_S = float(os.environ.get("SPECTRA_DIST_TIMEOUT", 1800))


class DistributedError(SpectraError):
    """Another rank of a distributed run failed, was killed, or stopped answering."""


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


def launched() -> bool:
    """True when a launcher such as ``torchrun`` started this process as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when the run asked for CUDA without an
    index (one GPU per rank), else ``device`` unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by the launcher's environment (``env://``).

    Args:
        device: the compute device of this rank (after :func:`rank_device`); CUDA selects NCCL.
        timeout_s: how long an exchange may wait for the other ranks.

    Raises:
        ConfigError: not started by a launcher (no ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``).
        DistributedError: the rendezvous failed.
    """
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, False)
    missing = [v for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing or not dist.is_available():
        raise ConfigError(f"--distributed needs a launcher: {', '.join(missing) or 'torch.distributed'} not set",
                          hint="start it with `torchrun --nproc-per-node N -m spectra diff ...`")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous errors come as many types; report them as one line
        raise DistributedError(f"could not join the distributed run ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                               hint="check MASTER_ADDR/MASTER_PORT and that every node runs the same torchrun command") from exc
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, True)


def exchange(ctx: DistContext, obj: Any, *, where: str) -> list[Any]:
    """All ranks' ``obj`` (a list indexed by rank), after every rank has called this.

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
            hint="results exchanged so far are journaled by rank 0; rerun the same command with --resume to finish",
        ) from exc
    return out


def broadcast(ctx: DistContext, obj: Any, *, where: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj if ctx.rank == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as exc:
        raise DistributedError(f"rank {ctx.rank}: rank 0 failed or was killed while {where}",
                               hint="rerun the same command with --resume to finish") from exc
    return box[0]


def close(ctx: DistContext | None) -> None:
    """Leave the process group if :func:`init` created it."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
