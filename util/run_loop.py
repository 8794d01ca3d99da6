"""The run skeleton every training entry point shares (main_finetune.py's Trainer, main_pretrain.py's
Pretraining): what a run is in its output folder (a fresh run, the continuation of the folder's run, a refusal,
or a finished run with nothing to do), then the loop over epochs with its checkpoints, stops, resume, log.txt
and TensorBoard.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

import engine_finetune
from util.checkpoint import (
    Checkpointer,
    ResumePoint,
    describe_position,
    end_of_epoch_stats,
    last_good_sentence,
    next_position,
    read_position,
    recorded_args,
    saved_position,
    seed_epoch,
    set_rng_state,
)
from util.config import Config
from util.datasets import build_loader, pins_memory
from util.distributed import get_rank, get_world_size, is_main_process, log
from util.errors import UserError
from util.lr_sched import Schedule, schedule_change
from util.output import (
    CHECKPOINT,
    NUMBERED,
    logged_epochs,
    open_log_writer,
    run_files,
    same_path,
    trim_log,
    warn_if_little_space,
    write_log,
)
from util.run_control import RunControl
from util.run_record import RECORD_KEY, Console, flag_values, recorded_starts, start_record, write_run_files
from util.samplers import ResumableDistributedSampler
from util.tracking import write_curves

# The final values TensorBoard's hyper-parameter table shows beside the flags.
HPARAM_METRICS = ('test_acc1', 'ema_test_acc1', 'best_test_acc1', 'best_ema_test_acc1', 'train_loss')


# ---- what the run is in its folder, decided at start --------------------------------------------------------
def describe_run(output_dir: str) -> str:
    """What the run in ``output_dir`` left: its latest checkpoint's position and when it was written."""
    files = run_files(output_dir)
    latest = os.path.join(output_dir, CHECKPOINT)
    what = ', '.join(files[:6]) + (f' and {len(files) - 6} more' if len(files) > 6 else '')
    if os.path.isfile(latest):
        when = datetime.datetime.fromtimestamp(os.path.getmtime(latest)).isoformat(sep=' ', timespec='minutes')
        try:
            position = read_position(latest)
            where = 'weights only, no training position' if position is None else describe_position(position)
        except Exception:  # any unreadable file: its position is unknown, its presence is what matters
            where = 'unreadable'
        return f"{what}; checkpoint.pth: {where}, written {when}"
    return what


def check_run_folder(out: str, resume: str, resume_from: str | None, evaluating: bool = False) -> None:
    """Decide what this run is in --output_dir ``out``: a fresh run (the folder holds no run), the continuation
    of the run there (``resume_from``, the checkpoint --resume ``resume`` gave, is one of the folder's own), or a
    refusal that names what is there and the two ways on. Evaluation writes only eval_results.json and is never
    refused."""
    if evaluating or not out:
        return
    present = run_files(out)
    if not present:
        return
    if resume_from and os.path.realpath(os.path.dirname(os.path.abspath(resume_from))) == os.path.realpath(out):
        check_not_a_fork(out, resume_from)
        return
    here = describe_run(out)
    if resume == 'allow':  # no checkpoint.pth, but other files of a run
        numbered = sorted((int(NUMBERED.fullmatch(f).group(1)), f) for f in present if NUMBERED.fullmatch(f))
        hint = (f"continue from its last numbered checkpoint with --resume {os.path.join(out, numbered[-1][1])}"
                if numbered else "continue it from one of its checkpoints with --resume PATH")
        raise UserError(f"--resume allow: --output_dir {out!r} holds a run without checkpoint.pth ({here}); a "
                        f"fresh run would replace its files. {hint[0].upper() + hint[1:]}, or give this run "
                        "another --output_dir.")
    source = (f"--resume {resume!r} continues a run from another folder, but " if resume else '')
    raise UserError(f"{source}--output_dir {out!r} holds a run ({here}), whose files this run would replace. "
                    "Continue that run with --resume allow, or give this run another --output_dir.")


def check_not_a_fork(output_dir: str, resume_from: str) -> None:
    """Resuming an older checkpoint of the folder (e.g. checkpoint-1.pth) where the folder's checkpoint.pth is
    further on would replace the later epochs' checkpoints and log lines: refused before anything is replaced,
    naming the way to keep them (another --output_dir) and the way to go back deliberately."""
    latest = os.path.join(output_dir, CHECKPOINT)
    if not os.path.isfile(latest) or same_path(latest, resume_from):
        return
    try:
        later, earlier = read_position(latest), read_position(resume_from)
    except Exception:  # an unreadable checkpoint.pth: the numbered one is the way on (see intact_neighbour)
        return
    if later is None or earlier is None:
        return
    if next_position(later) <= next_position(earlier):
        return

    raise UserError(f"--resume {resume_from!r} ({describe_position(earlier)}) is an earlier checkpoint of the run in "
                    f"--output_dir {output_dir!r}, whose checkpoint.pth is further on ({describe_position(later)}): "
                    "continuing from it here would replace that run's later checkpoints and log.txt lines. To branch "
                    "off it and keep the run, give this run another --output_dir (the checkpoint is read from where it "
                    "is); to continue the run itself use --resume allow; to take the run back to it, move "
                    "checkpoint.pth and the later numbered checkpoints out of the folder first.")


def epoch_end_missing(ckpt: dict | None, ckpt_path: str | None, output_dir: str) -> bool:
    """Whether the run folder's own end-of-epoch checkpoint lacks its epoch's evaluation and log.txt line (a stop
    or a kill between the two): the resumed run writes them first."""
    return (end_of_epoch_stats(ckpt) is not None and bool(output_dir) and os.path.isdir(output_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), output_dir)
            and saved_position(ckpt)[0] not in logged_epochs(output_dir))


def finished(ckpt: dict | None, ckpt_path: str | None, epochs: int | None, output_dir: str) -> bool:
    """Whether the resumed run has trained all ``epochs`` and written their ends (a finished run resumed again,
    e.g. --resume allow in a requeued job, is not an error: it says so)."""
    if ckpt is None or epochs is None or next_position(ckpt)[0] < epochs \
            or epoch_end_missing(ckpt, ckpt_path, output_dir):
        return False
    done = next_position(ckpt)[0]
    extent = f"the last of its {epochs} epochs" if done == epochs else \
        f"and --epochs {epochs} asks for no more than it has trained ({done})"
    log(f"nothing to do: {ckpt_path} has finished epoch {done - 1}, {extent}; to train longer raise --epochs, to "
        "evaluate add --eval")
    return True


# ---- the loop over epochs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunParts:
    """What the loop over epochs is given: its ``name`` in the lines it prints ('training'), the run's
    configuration (seed, batch_size, print_freq, checkpoint_minutes, output_dir, log_dir), the training step, the
    training set with its ``fingerprint`` (a mid-epoch checkpoint continues only on the same one), the schedule,
    the checkpointer of the run's components, the checkpoint it resumes (with its path), if any, and the names of
the script's flags (what the run's config.yaml records: util.run_record)."""
    name: str
    cfg: Config
    step: engine_finetune.TrainingStep
    dataset: torch.utils.data.Dataset
    fingerprint: dict
    schedule: Schedule
    checkpointer: Checkpointer
    ckpt: Optional[dict] = None
    ckpt_path: Optional[str] = None
    flags: tuple[str, ...] = ()  # the script's flags: what config.yaml holds
    collate: Optional[Callable] = None  # the loader's batching (util.datasets.build_loader's default: images, labels)


class EpochEnd:
    """What a run does at an epoch's end, after its checkpoint (evaluation, its log.txt line): the trainer's
    part of the loop. ``unfinished_part`` names what a stop between the checkpoint and ``end`` left undone."""
    unfinished_part = 'its log.txt line was not written'

    def end(self, epoch: int, train_stats: dict, evaluate_now: bool, loop: RunLoop) -> dict:
        raise NotImplementedError

    def due(self, epoch: int) -> bool:
        """Whether ``epoch``'s end evaluates."""
        return True

    def best(self) -> dict:
        """The best accuracies so far, recorded in checkpoints."""
        return {}

    def finish(self, stats: dict) -> None:
        """After the last epoch."""


class RunLoop:
    """The run's loop over epochs: each epoch from the resumed step (train_one_epoch), its checkpoint, then its
    end (``EpochEnd``); mid-epoch checkpoints and stops agreed by the ranks at a step or at an epoch's end.
    Building it resumes the checkpoint it is given (components, position, log.txt) and opens TensorBoard."""

    def __init__(self, parts: RunParts, end: EpochEnd) -> None:
        self.parts, self.end, self.cfg, self.checkpointer = parts, end, parts.cfg, parts.checkpointer
        cfg, world = parts.cfg, get_world_size()
        self.sampler = ResumableDistributedSampler(parts.dataset, world, get_rank(), shuffle=True, seed=cfg.seed)
        self.loader = build_loader(parts.dataset, self.sampler, cfg.batch_size, cfg.num_workers,
                                   pins_memory(cfg.pin_mem, cfg.device), train=True, collate=parts.collate)
        self.steps_per_epoch = self.sampler.num_samples // cfg.batch_size  # the loader drops the last partial batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(parts.dataset)} training images on {world} processes make no full batch of "
                            f"{cfg.batch_size}; lower --batch_size")
        if is_main_process() and cfg.output_dir:
            warn_if_little_space(cfg.output_dir, self.checkpointer.size(), bool(cfg.save_every))
        self.start = ResumePoint(getattr(cfg, 'start_epoch', 0), 0, None, None)  # main_pretrain.py has none
        if parts.ckpt is not None:
            saved = recorded_args(parts.ckpt)
            self.start = self.checkpointer.load(parts.ckpt, parts.ckpt_path, cfg.batch_size, self.steps_per_epoch,
                                                cfg.seed, parts.fingerprint)
            trim_log(cfg.output_dir, self.start.epoch)
            change = schedule_change(saved, parts.schedule, self.start.epoch + self.start.step / self.steps_per_epoch)
            if change:
                log(f"resumed with a change: {change}")
        self.starts = recorded_starts(parts.ckpt) + [start_record(cfg.command, self.start.epoch, self.start.step)]
        self.checkpointer.record = {**self.checkpointer.record, RECORD_KEY: self.starts}  # checkpoints carry it
        self.log_writer = open_log_writer(cfg, int((self.start.epoch + self.start.step / self.steps_per_epoch)
                                                   * 1000))
        self.unfinished = parts.ckpt if epoch_end_missing(parts.ckpt, parts.ckpt_path, cfg.output_dir) else None

    def save(self, epoch: int, step: Optional[int], partial: Optional[dict] = None,
             epoch_stats: Optional[dict] = None, with_best: bool = False) -> bool:
        """The run's checkpoint at (epoch, step); whether it was written (not without an output folder)."""
        return self.checkpointer.save(epoch, step, self.end.best(), partial, epoch_stats, with_best)

    def train_epoch(self, epoch: int, control: RunControl) -> tuple[dict, bool]:
        """One epoch (from the resumed step in the first), its checkpoint and, unless a stop was agreed at its
        last step, its end; returns the epoch's stats and whether its checkpoint was written."""
        cfg, start = self.cfg, self.start
        seed_epoch(cfg.seed, epoch, get_rank(), self.loader.generator)
        first_step = start.step if epoch == start.epoch else 0
        if first_step and start.rng is not None:
            set_rng_state(start.rng)
        self.sampler.set_epoch(epoch, start_index=first_step * cfg.batch_size)
        try:
            train_stats = engine_finetune.train_one_epoch(
                self.parts.step, self.loader, epoch, self.parts.schedule, print_freq=cfg.print_freq,
                start_step=first_step, steps_per_epoch=self.steps_per_epoch, control=control,
                partial=start.partial if first_step else None, log_writer=self.log_writer)
        except engine_finetune.NonFiniteLossError as e:
            e.args = (f"{e} Training stopped; " + last_good_sentence(self.checkpointer.last_good),)
            raise
        try:
            saved = self.save(epoch, None, epoch_stats=train_stats)
        except UserError:  # e.g. a full disk: the epoch's line still goes into log.txt (it is trained again)
            with contextlib.suppress(OSError):
                write_log(cfg.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
            raise
        # a stop agreed at the epoch's last step: no evaluation now (the run itself ends after the last epoch)
        stopping = control.stop_at_epoch_end is not None and epoch + 1 < self.parts.schedule.epochs
        stats = self.end.end(epoch, train_stats, not stopping and self.end.due(epoch), self)
        if is_main_process():
            write_curves(cfg.output_dir)
        return stats, saved

    def fit(self) -> dict:
        """Finish the resumed epoch's end if a stop left it undone, then train the remaining epochs."""
        stats, epochs = {}, self.parts.schedule.epochs
        if self.unfinished is not None:
            epoch = saved_position(self.unfinished)[0]
            log(f"finishing epoch {epoch} of {self.checkpointer.last_good}: {self.end.unfinished_part}")
            stats = self.end.end(epoch, end_of_epoch_stats(self.unfinished), self.end.due(epoch), self)
        control = RunControl(self.cfg.checkpoint_minutes, self.save)
        config = flag_values(self.cfg, self.parts.flags)
        write_run_files(self.cfg.output_dir, config, self.starts, Console.current)
        if self.log_writer is not None:
            self.log_writer.add_config(config, self.starts)
        if not self.cfg.output_dir:
            log("no --output_dir: no checkpoint is written, so a stop (SIGINT / SIGTERM) keeps nothing of this run")
        log(f"start {self.parts.name} for {epochs} epochs ({self.steps_per_epoch} steps each) from epoch "
            f"{self.start.epoch}" + (f", step {self.start.step}" if self.start.step else ''))
        start_time = time.time()
        for epoch in range(self.start.epoch, epochs):
            stats, saved = self.train_epoch(epoch, control)
            if epoch + 1 < epochs:
                control.stop_after_epoch(saved)
        log(f"{self.parts.name} time {datetime.timedelta(seconds=int(time.time() - start_time))}")
        self.end.finish(stats)
        if self.log_writer is not None:
            self.log_writer.add_hparams(config, {k: v for k, v in stats.items() if k in HPARAM_METRICS})
            self.log_writer.close()
        return stats

    def log_scalars(self, prefix: str, stats: dict, x: int) -> None:
        """TensorBoard points of an epoch's end (rank 0; none without --log_dir)."""
        if self.log_writer is not None:
            for k, v in stats.items():
                self.log_writer.add_scalar(f"{prefix}/{k}", v, x)

    def flush(self) -> None:
        if self.log_writer is not None:
            self.log_writer.flush()
