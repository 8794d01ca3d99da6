"""Mid-epoch checkpoints and orderly stops, decided by all ranks together.

The training loop already reads its loss sums back every ``print_freq`` steps with one all-reduce;
two flags ride along: rank 0's "a checkpoint is due" (every ``--checkpoint_minutes``) and any
rank's "stop requested" (set by a preemption signal handler). Every rank therefore sees the same
decision at the same step: all save that step's state together, and on a stop all leave the loop
together, so none is left waiting in a collective.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from util.distributed import is_main_process, log

_stop_requested = False


def request_stop(*_signal_args) -> None:
    """Ask the training loop to checkpoint and stop at its next sync point (safe in a signal handler)."""
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    return _stop_requested


def clear_stop() -> None:
    global _stop_requested
    _stop_requested = False


class Preempted(Exception):
    """Training stopped on request after saving its state at (epoch, step)."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"stopped on request at epoch {epoch}, step {step}, after saving the checkpoint")
        self.epoch, self.step = epoch, step


class RunControl:
    """Holds the checkpoint clock and the save callback ``save(epoch, steps_done)``."""

    def __init__(self, checkpoint_minutes: float, save: Callable[[int, int], None]) -> None:
        self.interval = checkpoint_minutes * 60.0
        self.save = save
        self.last_save = time.time()

    def local_flags(self) -> list[float]:
        """This rank's votes: [checkpoint due (rank 0's clock), stop requested]."""
        due = self.interval > 0 and is_main_process() and time.time() - self.last_save >= self.interval
        return [float(due), float(stop_requested())]

    def act(self, flags: list[float], epoch: int, steps_done: int, steps_per_epoch: int) -> None:
        """Apply the all-reduced votes: save the state after ``steps_done`` steps, and stop if asked."""
        due, stop = flags[0] > 0, flags[1] > 0
        if stop or (due and steps_done < steps_per_epoch):  # at the epoch's end its own checkpoint follows
            self.save(epoch, steps_done)
            self.last_save = time.time()
            log(f"checkpoint written at epoch {epoch}, step {steps_done}/{steps_per_epoch}")
        if stop:
            raise Preempted(epoch, steps_done)
