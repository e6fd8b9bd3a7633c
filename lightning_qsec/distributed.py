"""End a DDP run cleanly: destroy the process group, and collect the ranks Lightning launched.

Lightning's ``ddp`` strategy never destroys a gloo process group (it registers
``destroy_process_group`` at exit for NCCL only). Its worker threads
(``pt_gloo_runloop``) are then still alive while the interpreter finalizes, and a
worker that drops the last reference to a finished collective (``~AsyncWork`` frees
tensors that own Python objects) must take the GIL to decref them; during
finalization CPython ends such a thread with ``pthread_exit``, whose forced unwind
through the ``noexcept`` destructor calls ``std::terminate``: "terminate called without
an active exception", exit code 134, after all the work is done. It is a race, so it
strikes now and then. :func:`shutdown_distributed` destroys the process group, which
joins those threads while the interpreter is still whole. Call it on every rank at the
end of a DDP script, after the last ``fit``/``test``/``predict``.

Lightning's launcher also does not wait for the processes it starts for ranks
``1..N-1``: rank 0 may exit with 0 while another rank is still running or has aborted.
Given the trainer, :func:`shutdown_distributed` waits for them on the launching process
and returns the worst of their exit codes, so a script can hand it on to ``sys.exit``.
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["broadcast_from_rank_zero", "shutdown_distributed", "wait_for_launched_processes"]


def broadcast_from_rank_zero(tensors: Any) -> None:
    """Overwrite ``tensors`` (an iterable of tensors) in place with rank 0's values.

    What DDP does to buffers at a synchronised forward, for state it does not cover
    (statistics that change inside ``no_sync`` micro-batches, state kept outside the
    module). A no-op without an initialised process group or with one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def _launched_processes(trainer: Any) -> list[subprocess.Popen[Any]]:
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = getattr(launcher, "procs", None)
    return list(procs) if procs else []


def wait_for_launched_processes(trainer: Any, timeout: float | None = 120.0) -> int:
    """Wait for the processes Lightning's launcher started (ranks ``1..N-1``); the worst exit code.

    Only the launching process (rank 0 of a script started with ``python script.py``) has
    any; elsewhere, and without DDP, this returns 0 at once. A negative code is a signal
    (``-6``: abort, the "terminate called" crash). A process still running after
    ``timeout`` seconds is killed and counted as ``-9``.

    Args:
        trainer: the ``pytorch_lightning.Trainer`` that ran with ``strategy="ddp"``.
        timeout: seconds to wait for each process (``None``: no limit).
    """
    worst = 0
    for proc in _launched_processes(trainer):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0 and (worst == 0 or code < 0):
            worst = code
    return worst


def shutdown_distributed(trainer: Any = None, *, timeout: float | None = 120.0) -> int:
    """Destroy the default process group on this rank, then wait for the launched ranks.

    Call it on every rank once the last ``fit``/``test``/``predict`` has returned. Every
    rank first meets the others at a barrier (no rank tears its end down while a peer
    still talks to it), then ``torch.distributed.destroy_process_group()`` stops and
    joins the backend's threads and closes the store, so nothing is left running when
    the interpreter exits. Safe to call without DDP, twice, or when no process group
    was ever created.

    Args:
        trainer: if given, the launching process also waits for the ranks Lightning's
            launcher started (see :func:`wait_for_launched_processes`).
        timeout: seconds to wait for each launched process.

    Returns:
        0, or the worst exit code of the launched processes (non-zero if one failed).

    Example:
        >>> from lightning_qsec.distributed import shutdown_distributed
        >>> shutdown_distributed()  # no process group: nothing to do
        0
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    if trainer is None:
        return 0
    return wait_for_launched_processes(trainer, timeout=timeout)

