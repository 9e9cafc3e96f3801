"""A SLURM job that reaches its time limit is requeued, and continues where it stopped.

`hydra/launcher=slurm` submits each sweep job through submitit, which asks SLURM for a signal
(USR2) `signal_delay_s` before the time limit and installs a handler for it: the handler
resubmits the job (`scontrol requeue`: same job id, same pickled sweep job, hence the same run
directory) and exits at once, wherever the program is. Left alone, that handler would stop
training halfway through a step, and the requeued job would go back to the last periodic
checkpoint, losing the steps since.

So while training runs, the signal is taken over: it stops training after the current step,
like SIGTERM (`lmlab.callbacks.CheckpointOnInterrupt` saves `checkpoints/last.ckpt`), and only
then is submitit's handler run, which requeues the job. A requeued job (SLURM counts it in
SLURM_RESTART_COUNT) that was given no ckpt_path resumes from that file, as `ckpt_path=auto`
does: starting afresh over the run's own directory is never what a requeue means.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from lmlab.private_apis import note_sigterm

log = logging.getLogger("lmlab")

# set by SLURM in a job that was requeued (by submitit, scontrol requeue or preemption)
RESTART_COUNT_ENV = "SLURM_RESTART_COUNT"
# submitit's name for the signal it requests from SLURM (`--signal=USR2@signal_delay_s`)
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"

Handler = Callable[[int, FrameType | None], Any]


class _State:
    """Signals belong to the process: one record of who handles the requeue signal."""

    submitit_handler: Handler | None = None  # submitit's, while training holds the signal
    signalled = False  # the signal came during training: requeue once the checkpoint is saved


_state = _State()


def requeue_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (USR2 unless changed)."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        return signal.SIGUSR2  # submitit itself would have refused to start the job


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("submitit.")


def hold_during_training(trainer: Any) -> bool:
    """In a submitit job: make the requeue signal stop `trainer` after the current step, as
    SIGTERM does (see `requeue_if_signalled`). False, and nothing changed, anywhere else."""
    signum = requeue_signal()
    handler = signal.getsignal(signum)
    if not _is_submitit_handler(handler):
        return False

    def stop_after_step(received: int, frame: FrameType | None) -> None:
        _state.signalled = True
        log.warning(
            "%s: the job's time limit is near: saving a checkpoint after this step, then "
            "requeueing the job",
            signal.Signals(received).name,
        )
        note_sigterm(trainer)

    _state.submitit_handler, _state.signalled = handler, False
    signal.signal(signum, stop_after_step)
    return True


def release() -> None:
    """Training is over (called when it ends, and again once Lightning's teardown has put
    back the handlers it found): the signal no longer requeues. A requeued job would find its
    `last.ckpt` finished and refuse it, so the run finishes its last validation and writing
    (the `signal_delay_s` before the limit are for that) instead. After training stopped on
    the signal, `requeue_if_signalled` still calls submitit's handler itself."""
    if _state.submitit_handler is None:
        return

    def finish_instead(received: int, frame: FrameType | None) -> None:
        log.warning(
            "%s: the job's time limit is near, but training is over: finishing without a requeue",
            signal.Signals(received).name,
        )

    signal.signal(requeue_signal(), finish_instead)


def was_signalled() -> bool:
    return _state.signalled


def requeue_if_signalled() -> None:
    """After training stopped on the requeue signal and its checkpoint was saved: run
    submitit's handler, which resubmits this job and exits (or, once the job has timed out
    `max_num_timeout` times, raises submitit's UncompletedJobError, which ends it). Nothing
    when training stopped for another reason."""
    handler = _state.submitit_handler
    if not _state.signalled or handler is None:
        return
    _state.signalled, _state.submitit_handler = False, None
    handler(requeue_signal(), None)


def ckpt_path_for_this_job(ckpt_path: str | None) -> str | None:
    """`ckpt_path` as given; `auto` in a requeued SLURM job given none, so that it continues
    from its run directory's `checkpoints/last.ckpt` (lmlab.checkpoint.resolve_auto)."""
    restarts = os.environ.get(RESTART_COUNT_ENV, "0")
    if ckpt_path is None and restarts.isdigit() and int(restarts) > 0:
        log.info("requeued SLURM job (restart %s): ckpt_path=auto", restarts)
        return "auto"
    return ckpt_path
