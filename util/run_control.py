"""Mid-epoch checkpoints and orderly stops, decided by all ranks together.

The training loop already reads its loss sums back every ``print_freq`` steps with one all-reduce;
two flags ride along: rank 0's "a checkpoint is due" (every ``--checkpoint_minutes``) and any
rank's "stop requested" (set by a preemption signal handler). Every rank therefore sees the same
decision at the same step: all save that step's state together, and on a stop all leave the loop
together, so none is left waiting in a collective. A stop agreed at an epoch's last step is an end of
epoch: the loop finishes the epoch (its checkpoint and log line) and stops after it.

Outside SLURM, SIGINT and SIGTERM request the same orderly stop (``stop_on_signals``); a second
signal exits at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

from util.distributed import is_main_process, log

_stop_requested = False
_stop_signal: Optional[int] = None
_stop_keeps = True  # whether a stop writes a checkpoint (not without an output folder), for the handler's line


def request_stop(*_signal_args) -> None:
    """Ask the training loop to checkpoint and stop at its next sync point (safe in a signal handler)."""
    global _stop_requested
    _stop_requested = True


def _on_stop_signal(signum: int, _frame) -> None:
    global _stop_signal
    name = signal.Signals(signum).name
    if _stop_signal is not None:
        # os.write: print() is not safe inside a handler that interrupted another print
        os.write(sys.stderr.fileno(), f"second {name}: exiting now, without a checkpoint\n".encode())
        os._exit(128 + signum)
    _stop_signal = signum
    request_stop()
    kept = "after writing a checkpoint" if _stop_keeps else "keeping nothing (no --output_dir)"
    os.write(sys.stderr.fileno(), f"{name} received: stopping at the next step that is a multiple of "
                                  f"--print_freq, {kept} (send it again to exit at once)\n".encode())


@contextmanager
def stop_on_signals(enabled: bool = True, keeps_checkpoint: bool = True) -> Iterator[None]:
    """While training: SIGINT / SIGTERM checkpoint and stop at the next sync point; a second one exits at once.
    ``keeps_checkpoint``: whether the run has a folder to write the checkpoint into (its line says so).

    Only where nobody else handles them (Python's defaults): under submitit, SLURM's signals stay its
    own. The previous handlers come back afterwards, and a stop that one of them requested is cleared."""
    global _stop_keeps
    _stop_keeps = keeps_checkpoint
    installed = {}
    if enabled and threading.current_thread() is threading.main_thread():
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                installed[signum] = signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)
        if installed and _stop_signal is not None:
            clear_stop()  # the signal stopped this run; a later run in the same process starts afresh


def stop_signal() -> Optional[int]:
    """The signal that requested the stop (SIGINT / SIGTERM), if one did."""
    return _stop_signal


def stop_requested() -> bool:
    return _stop_requested


def clear_stop() -> None:
    global _stop_requested, _stop_signal
    _stop_requested = False
    _stop_signal = None


class Preempted(Exception):
    """Training stopped on request at (epoch, step); ``saved``: whether its checkpoint was written there."""

    def __init__(self, epoch: int, step: int, saved: bool) -> None:
        super().__init__(f"stopped on request at epoch {epoch}, step {step}, "
                         + ("after saving the checkpoint" if saved else "without a checkpoint (no output folder)"))
        self.epoch, self.step, self.saved = epoch, step, saved
        # the signal that asked for it, kept here: leaving the run clears the module's record
        self.signum = stop_signal()


class RunControl:
    """Holds the checkpoint clock and the save callback ``save(epoch, steps_done, partial_epoch)``, which returns
    whether it wrote the checkpoint."""

    def __init__(self, checkpoint_minutes: float, save: Callable[[int, int, dict], bool]) -> None:
        self.interval = checkpoint_minutes * 60.0
        self.save = save
        self.last_save = time.time()
        self.stop_at_epoch_end: Optional[tuple[int, int]] = None

    def local_flags(self) -> list[float]:
        """This rank's votes: [checkpoint due (rank 0's clock), stop requested]."""
        due = self.interval > 0 and is_main_process() and time.time() - self.last_save >= self.interval
        return [float(due), float(stop_requested())]

    def act(self, flags: list[float], epoch: int, steps_done: int, steps_per_epoch: int,
            partial: Optional[dict] = None) -> None:
        """Apply the all-reduced votes: save the state after ``steps_done`` steps, and stop if asked.

        At the epoch's last step the epoch's own checkpoint follows: a stop there waits for it
        (``stop_after_epoch``), since a mid-epoch checkpoint with nothing left of its epoch is useless."""
        due, stop = flags[0] > 0, flags[1] > 0
        if steps_done >= steps_per_epoch:
            if stop:
                self.stop_at_epoch_end = (epoch, steps_done)
            return
        saved = False
        if stop or due:
            saved = self.save(epoch, steps_done, partial)
            self.last_save = time.time()
            if saved:
                log(f"checkpoint written at epoch {epoch}, step {steps_done}/{steps_per_epoch}")
        if stop:
            raise Preempted(epoch, steps_done, saved)

    def stop_after_epoch(self, saved: bool) -> None:
        """Raise Preempted if a stop was agreed at the end of the epoch just ended; ``saved``: whether the
        epoch's checkpoint was written."""
        if self.stop_at_epoch_end is not None:
            raise Preempted(*self.stop_at_epoch_end, saved)


def reporting_stop(run: Callable[[Optional[list]], dict], argv: Optional[list] = None) -> dict:
    """``run(argv)`` of an entry point, with a requested stop (SIGINT / SIGTERM) reported in one line (what was
    kept) and the process ending with the signal's status, 128 + N."""
    try:
        return run(argv)
    except Preempted as stop:
        kept = ("checkpoint written at epoch {}, step {}; continue with --resume allow" if stop.saved else
                "at epoch {}, step {}; nothing was kept (no --output_dir): a new run starts from the beginning")
        print("stopped: " + kept.format(stop.epoch, stop.step), file=sys.stderr, flush=True)
        os._exit(128 + stop.signum if stop.signum else 1)
