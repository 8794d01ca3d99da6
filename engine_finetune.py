"""One training epoch and one evaluation pass.

A training step: forward (student, and teacher where the model has one), criterion, backward,
optimizer step with clipping and loss scaling, EMA update. Loss terms are summed on the device and
read back only every ``print_freq`` steps, so the loop does not wait on the host between steps;
the same read-back checks that every loss was finite, agreed over all ranks.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from models_pair import EvaluationMaps, TeacherStudentPair
from util import lr_sched
from util.distributed import all_reduce_sum, get_world_size, log
from util.errors import UserError
from util.run_control import RunControl


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite; training stops without writing a checkpoint. The message says which
    terms and what to change (reported as one ``error:`` line, like bad input: the fix is a flag)."""


class StepStats:
    """Device-side sums of the loss terms between read-backs, and the first non-finite step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.steps = 0
        self.images = 0
        self.skipped = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms: Optional[torch.Tensor] = None

    def add(self, names: list[str], values: torch.Tensor, step: int, images: int, skipped: int) -> None:
        """Accumulate one step's loss terms (``values[i]`` is term ``names[i]``), on the device."""
        if self.sums is None:
            self.names = names
            self.sums = torch.zeros_like(values)
            self.bad_terms = torch.zeros_like(values)
        self.sums += values
        first = (self.first_bad_step < 0) & ~torch.isfinite(values).all()
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.bad_terms = torch.where(first, values, self.bad_terms)
        self.steps += 1
        self.images += images
        self.skipped += skipped

    def reduce(self, extra: Sequence[float] = ()) -> tuple[dict[str, float], int, int, int, Optional[tuple],
                                                       list[float]]:
        """Sum over ranks; returns (sum of each term, steps, images, skipped, first non-finite step or None,
        the summed ``extra`` votes). Steps, images and skipped are summed over ranks too.

        One host synchronisation; every rank must call it at the same step."""
        n = len(self.names)
        counts = [self.steps, self.images, self.skipped, 0.0, *extra]
        sums = self.sums if self.sums is not None else torch.zeros(0, device=self.device)
        packed = torch.cat([sums, torch.tensor(counts, device=self.device, dtype=torch.float)])
        packed[n + 3] = (self.first_bad_step >= 0).float()
        packed = all_reduce_sum(packed).tolist()
        failure = None
        if packed[n + 3] > 0:
            step = int(self.first_bad_step.item())
            failure = (step, dict(zip(self.names, self.bad_terms.tolist()))) if step >= 0 else (-1, {})
        sums = dict(zip(self.names, packed[:n]))
        return sums, int(packed[n]), int(packed[n + 1]), int(packed[n + 2]), failure, packed[n + 4:]

    def reset(self) -> None:
        if self.sums is not None:
            self.sums.zero_()
        self.steps = self.images = self.skipped = 0


class EpochTotals:
    """The epoch's loss sums so far over all ranks, on the host, from the read-backs.

    A mid-epoch checkpoint carries ``state()``; the resumed run starts from it, so the epoch's log line
    covers the steps trained before the stop as well."""

    def __init__(self, state: Optional[dict] = None) -> None:
        state = state or {}
        self.sums: dict[str, float] = dict(state.get('sums', {}))
        self.steps = int(state.get('steps', 0))
        self.images = int(state.get('images', 0))
        self.skipped = int(state.get('skipped', 0))

    def add(self, sums: dict[str, float], steps: int, images: int, skipped: int) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += steps
        self.images += images
        self.skipped += skipped

    def means(self) -> dict[str, float]:
        return {name: value / max(self.steps, 1) for name, value in self.sums.items()}

    def state(self) -> dict:
        return {'sums': dict(self.sums), 'steps': self.steps, 'images': self.images, 'skipped': self.skipped}


def non_finite_advice(terms: dict[str, float]) -> str:
    """What to do about a non-finite loss; the learning rate is blamed only when nothing points elsewhere.

    When the task loss is still finite but another term is not, the student's predictions (and so its
    weights) are fine and the weighted extra term (the teacher's side) is at fault, not the lr."""
    task = terms.get('loss_task')
    extra = [k for k, v in terms.items() if k not in ('loss', 'loss_task') and not math.isfinite(v)]
    if task is not None and math.isfinite(task) and extra:
        return (f"loss_task is finite but {', '.join(extra)} is not, so this is not a diverging learning rate "
                "(lowering it will not help): check that term's weight (--atd_weight) and the teacher's weights "
                "(--finetune) for NaN or infinite values, and use --amp bf16 instead of fp16 (an fp16 teacher "
                "can overflow).")
    return "Lower the learning rate, set --clip_grad, or use --amp bf16 instead of fp16."


@dataclass
class TrainingStep:
    """The fixed parts of a training step: what is trained (``model``: the pair, DDP-wrapped where distributed),
    its loss (``criterion(outputs, targets) -> (loss, terms)``), the optimizer with its grad scaler, gradient
    accumulation over ``accum_iter`` micro-batches, clipping, mixup, the EMA of ``ema_source`` (the student) and
    ``aux_optimizer``, which steps the criterion's own parameters (probe: noise adaptation), their gradients
    averaged over ranks."""
    model: nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    amp_dtype: Optional[torch.dtype] = None
    mixup_fn: Optional[Callable] = None
    model_ema: Optional[nn.Module] = None
    ema_source: Optional[nn.Module] = None
    aux_optimizer: Optional[torch.optim.Optimizer] = None
    targets_to_model: bool = False  # the model's forward takes the targets too (a detector computes its losses)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.aux_optimizer is not None:
            self.aux_optimizer.zero_grad(set_to_none=True)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, window_size: int,
                 update: bool) -> tuple[dict, int]:
        """Forward, loss and backward of one micro-batch, and at the window's end (``update``) the optimizer
        step; returns the loss terms (on the device) and the number of images trained on."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            if len(images) % 2:  # mixup pairs samples; an undecodable image can leave an odd batch
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup_fn(images, targets)
        skip_sync = hasattr(self.model, 'no_sync') and not update  # DDP: all-reduce once, at the window's end
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(images, targets) if self.targets_to_model else self.model(images)
                loss, terms = self.criterion(outputs, targets)
            # the window's gradient: the mean over its micro-batches
            self.scaler.scale(loss / window_size).backward()
        if update:
            self.update_weights()
        return terms, len(images)

    def update_weights(self) -> None:
        """Apply the accumulated gradients (clipped, unscaled), then the EMA."""
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained_parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        if self.aux_optimizer is not None:
            average_gradients(self.aux_optimizer)
            self.scaler.step(self.aux_optimizer)
            self.aux_optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model_ema is not None:
            self.model_ema.update(self.ema_source)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def apply_short_window(self, pending: int, window_size: int) -> None:
        """Apply a window the loader ended early, after ``pending`` of its ``window_size`` micro-batches: its
        gradient rescaled to their mean."""
        aux = [p for g in self.aux_optimizer.param_groups for p in g['params']] if self.aux_optimizer else []
        for p in self.trained_parameters() + aux:
            if p.grad is not None:
                p.grad.mul_(window_size / pending)
        self.update_weights()


def train_one_epoch(train_step: TrainingStep, data_loader: Iterable, epoch: int, schedule: lr_sched.Schedule,
                    print_freq: int = 20, start_step: int = 0, steps_per_epoch: Optional[int] = None,
                    control: Optional[RunControl] = None, partial: Optional[dict] = None,
                    log_writer=None) -> dict[str, float]:
    """Train for one epoch (or its rest, from ``start_step``) and return the epoch's mean loss terms.

    ``schedule`` gives the per-iteration lr. Every ``print_freq`` steps the loss sums are read back and logged,
    and ``control`` (util.run_control) may write a mid-epoch checkpoint or stop the loop, decided by all ranks
    together. ``partial`` is the resumed epoch's ``EpochTotals.state()`` from a mid-epoch checkpoint.
    """
    train_step.model.train()
    progress = EpochProgress(train_step, epoch, schedule, steps_per_epoch or len(data_loader) + start_step,
                             start_step, partial, log_writer)
    accum, last = train_step.accum_iter, progress.steps_per_epoch
    train_step.zero_grad()
    deferred: Optional[list[float]] = None  # a save or stop agreed inside a window, done at the window's end
    pending = 0  # micro-batches whose gradients are accumulated but not applied yet
    for step, (images, targets, skipped) in enumerate(data_loader, start=start_step):
        progress.batch_arrived()
        if step % accum == 0 or step == start_step:
            progress.lr = lr_sched.adjust_learning_rate(train_step.optimizer, epoch + step / last, schedule)
        if hasattr(train_step.criterion, 'set_progress'):  # a loss weighted by the position (--transfer_until)
            train_step.criterion.set_progress(epoch + step / last)
        if len(images) == 0:
            raise RuntimeError(f"epoch {epoch} step {step}: every image of the batch failed to decode; "
                               "check the data set (see the warnings above)")
        # the window's end: every K-th step, and the epoch's last step, which closes a shorter last window
        update = (step + 1) % accum == 0 or step + 1 >= last
        terms, n_images = train_step(images, targets, accumulation_window(step, start_step, accum, last), update)
        pending = 0 if update else pending + 1
        progress.add(terms, step, n_images, skipped)
        if (step + 1) % print_freq == 0 or step + 1 == last or (deferred is not None and update):
            votes = progress.read_back(step, control.local_flags() if control else ())
            if control is not None:
                if deferred is not None:
                    votes = [max(a, b) for a, b in zip(votes, deferred)]
                if update:  # a checkpoint holds no accumulated gradients: saves and stops happen at a window's end
                    deferred = None
                    control.act(votes, epoch, step + 1, last, progress.totals.state())
                elif any(v > 0 for v in votes):  # the same on every rank (the votes are all-reduced)
                    deferred = votes
        progress.step_done()
    if pending:  # a loader shorter than steps_per_epoch: its last window is applied as far as it went
        train_step.apply_short_window(pending, accumulation_window(step, start_step, accum, last))
    return progress.finish()


class EpochProgress:
    """An epoch's loss sums between read-backs and in total, its timing, and the lines it logs."""

    def __init__(self, step: TrainingStep, epoch: int, schedule: lr_sched.Schedule, steps_per_epoch: int,
                 start_step: int, partial: Optional[dict], log_writer) -> None:
        self.device, self.epoch, self.schedule = step.device, epoch, schedule
        self.steps_per_epoch, self.start_step, self.resumed = steps_per_epoch, start_step, bool(partial)
        self.log_writer = log_writer
        self.window, self.totals = StepStats(step.device), EpochTotals(partial)
        self.t_window = self.t_start = self.t_ready = time.time()
        self.data_wait = 0.0  # seconds of this window spent waiting for the loader's next batch
        self.lr = step.optimizer.param_groups[0]['lr']

    def batch_arrived(self) -> None:
        self.data_wait += time.time() - self.t_ready

    def step_done(self) -> None:
        self.t_ready = time.time()

    def add(self, terms: dict, step: int, images: int, skipped: int) -> None:
        values = torch.stack([t.detach().float() for t in terms.values()])
        self.window.add(list(terms), values, step, images, skipped)

    def check(self, extra: Sequence[float] = ()) -> tuple[dict[str, float], int, int, list[float]]:
        """Read the window back (all ranks), stop on a non-finite loss, add it to the epoch's totals."""
        sums, steps, images, skipped, failure, votes = self.window.reduce(extra)
        if failure is not None:
            bad_step, terms = failure
            where = f"step {bad_step}" if bad_step >= 0 else "a step on another rank"
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, {where} of {self.steps_per_epoch}: "
                + ', '.join(f"{k}={v}" for k, v in terms.items()) + ". " + non_finite_advice(terms))
        self.totals.add(sums, steps, images, skipped)
        return {k: v / max(steps, 1) for k, v in sums.items()}, images, skipped, votes

    def read_back(self, step: int, extra: Sequence[float]) -> list[float]:
        """The window's read-back, its progress line and TensorBoard points; returns the summed ``extra`` votes."""
        means, n_images, n_skipped, votes = self.check(extra)
        elapsed = time.time() - self.t_window
        per_step = (time.time() - self.t_start) / (step + 1 - self.start_step)
        steps_left = self.steps_per_epoch - step - 1
        run_steps_left = steps_left + (self.schedule.epochs - self.epoch - 1) * self.steps_per_epoch
        log(f"Epoch [{self.epoch}] [{step + 1}/{self.steps_per_epoch}]  "
            + '  '.join(f"{k} {v:.4f}" for k, v in means.items())
            + f"  lr {self.lr:.3e}  {n_images / max(elapsed, 1e-9):.1f} img/s"
            + f"  {progress_fields(self.data_wait, elapsed, self.device)}"
            + f"  eta {_hms(per_step * steps_left)} (run {_hms(per_step * run_steps_left)})"
            + (f"  skipped images {n_skipped}" if n_skipped else ''))
        if self.log_writer is not None:
            x = int((self.epoch + (step + 1) / self.steps_per_epoch) * 1000)  # epoch_1000x, as MAE
            for k, v in means.items():
                self.log_writer.add_scalar(f'train/{k}', v, x)
            self.log_writer.add_scalar('train/lr', self.lr, x)
        self.window.reset()
        self.t_window, self.data_wait = time.time(), 0.0
        return votes

    def finish(self) -> dict[str, float]:
        """The epoch's means (read back first when the loader ended before a read-back step) and its line."""
        if self.window.steps:
            self.check()
        means = self.totals.means()
        log(f"Epoch [{self.epoch}] averaged: " + '  '.join(f"{k} {v:.4f}" for k, v in means.items())
            + f"  ({self.totals.images} images on {get_world_size()} ranks in {_hms(time.time() - self.t_start)}"
            + (", resumed mid-epoch" if self.resumed else '') + ")")
        return {**means, 'lr': self.lr, 'skipped_images': self.totals.skipped}


def accumulation_window(step: int, start_step: int, accum: int, steps_per_epoch: int) -> int:
    """The number of micro-batches in the accumulation window of ``step``: windows are the epoch's steps
    [k * accum, (k + 1) * accum), cut at the epoch's end (its last window may be shorter) and, in a resumed epoch,
    at the step it resumed from. Each micro-batch's loss is divided by it, so that the window's gradient is the
    mean over its micro-batches whatever its length."""
    first = max(step - step % accum, start_step)
    return min(step - step % accum + accum, max(steps_per_epoch, step + 1)) - first


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of parameters outside DDP (the criterion's) over ranks."""
    world = get_world_size()
    if world == 1:
        return
    for group in optimizer.param_groups:
        for p in group['params']:
            if p.grad is not None:
                all_reduce_sum(p.grad).div_(world)


def progress_fields(data_wait: float, elapsed: float, device: torch.device) -> str:
    """The share of ``elapsed`` seconds spent waiting for data and, on CUDA, the peak memory allocated."""
    fields = f"data {100 * data_wait / max(elapsed, 1e-9):.0f}%"
    if device.type == 'cuda':
        fields += f"  mem {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
    return fields


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
def evaluate(
        data_loader: Iterable,
        model: nn.Module,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        distributed: bool = False,
        name: str = '',
        print_freq: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy of ``model`` on a labelled loader.

    With ``distributed``, each rank holds a disjoint shard and the counts are summed over ranks, so
    the numbers are exact; otherwise every rank evaluates the whole set. A progress line every
    ``print_freq`` batches (0: none).
    """
    return evaluate_ensemble(data_loader, {name or 'model': model}, device, amp_dtype, distributed,
                             print_freq)[name or 'model']


@torch.no_grad()
def evaluate_ensemble(
        data_loader: Iterable,
        models: dict[str, nn.Module],
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        distributed: bool = False,
        print_freq: int = 0,
) -> dict[str, dict[str, float]]:
    """Each model's accuracy and loss and, for two or more, those of their ``ensemble``: the average
    of their softmax outputs (its loss is the NLL of that average)."""
    names = list(models) + (['ensemble'] if len(models) > 1 else [])
    for model in models.values():
        model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    fix_evaluation_maps(data_loader, models.values(), device, autocast, distributed)
    sums = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # correct1, correct5, loss sum
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # images, skipped
    batches = len(data_loader) if hasattr(data_loader, '__len__') else 0
    t_start = t_ready = time.time()
    data_wait = 0.0
    for batch, (images, targets, skipped) in enumerate(data_loader, start=1):
        data_wait += time.time() - t_ready
        counts[1] += skipped
        if len(images) == 0:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        log_probs = []
        for model in models.values():
            with autocast:
                logits = model(images)
            log_probs.append(torch.log_softmax(logits.float(), dim=1))
        if len(models) > 1:
            log_probs.append(torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(models)))
        for row, lp in enumerate(log_probs):
            top = lp.topk(min(5, lp.shape[1]), dim=1).indices
            hit = top.eq(targets[:, None])
            sums[row, 0] += hit[:, 0].sum()
            sums[row, 1] += hit.any(dim=1).sum()
            sums[row, 2] += nn.functional.nll_loss(lp, targets, reduction='sum')
        counts[0] += len(targets)
        if print_freq and batch % print_freq == 0:
            elapsed = time.time() - t_start
            log(f"Test [{'/'.join(models)}] [{batch}/{batches}]  {progress_fields(data_wait, elapsed, device)}  "
                f"eta {_hms(elapsed / batch * (batches - batch))}")
        t_ready = time.time()
    if distributed:
        all_reduce_sum(sums)
        all_reduce_sum(counts)
    n, skipped = max(counts[0].item(), 1.0), int(counts[1].item())
    results = {}
    for row, name in enumerate(names):
        correct1, correct5, loss = sums[row].tolist()
        results[name] = {'acc1': 100.0 * correct1 / n, 'acc5': 100.0 * correct5 / n, 'loss': loss / n,
                         'images': int(counts[0].item()), 'skipped_images': skipped}
        log(f"* {name} Acc@1 {results[name]['acc1']:.3f} Acc@5 {results[name]['acc5']:.3f} "
            f"loss {results[name]['loss']:.3f} ({results[name]['images']} images"
            + (f", {skipped} skipped" if skipped else '') + ")")
    return results


@torch.no_grad()
def fix_evaluation_maps(data_loader: Iterable, models: Iterable[nn.Module], device: torch.device, autocast,
                        distributed: bool = False) -> None:
    """A copy student trained with the teacher's maps averaged over the images of each batch (--map_average
    examples) attends at evaluation with their mean over the whole evaluation set, every image of every rank:
    computed here, in a pass of the teacher over ``data_loader``, for each pair among ``models`` (and the pairs
    they wrap) that needs it, and kept for later evaluations on the same loader. The evaluated accuracy then
    depends on neither the batch size nor the number of processes."""
    pairs = [m for model in models for m in model.modules() if isinstance(m, TeacherStudentPair)
             and m.needs_evaluation_maps and (m.evaluation_maps is None or m.evaluation_maps.source is not data_loader)]
    if not pairs:
        return
    sums, images_seen = [{} for _ in pairs], 0
    for images, _, _ in data_loader:
        if len(images) == 0:
            continue
        images = images.to(device, non_blocking=True)
        with autocast:
            for total, pair in zip(sums, pairs):
                for layer, value in pair.teacher_map_sums(images).items():
                    total[layer] = value if layer not in total else total[layer] + value
        images_seen += len(images)
    count = torch.tensor(float(images_seen), dtype=torch.float64, device=device)
    if distributed:
        all_reduce_sum(count)
        for k, pair in enumerate(pairs):
            sums[k] = sums[k] or pair.teacher_map_sums(empty_batch(pair.student, device))
            for value in sums[k].values():
                all_reduce_sum(value)
    if count.item() == 0:
        raise UserError("the evaluation set gave no image to average the teacher's maps over (--map_average "
                        "examples); check --data_path's val/ folder")
    for total, pair in zip(sums, pairs):
        pair.evaluation_maps = EvaluationMaps({layer: (value / count).float() for layer, value in total.items()},
                                              data_loader, int(count.item()))
    log(f"--map_average examples: the copy student attends with the teacher's maps averaged over the "
        f"{int(count.item())} evaluation images")


def empty_batch(vit: nn.Module, device: torch.device) -> torch.Tensor:
    """No image, in the shape ``vit`` takes (a rank whose evaluation shard is empty still joins the reductions)."""
    return torch.zeros(0, vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size, device=device)


class Evaluator:
    """Top-1/top-5 and loss on the evaluation set of the raw weights (``test_*``) and, with an EMA, of the
    EMA student in the same pair (``ema_test_*``)."""

    def __init__(self, loader, device: torch.device, amp_dtype: Optional[torch.dtype], dist_eval: bool,
                 print_freq: int) -> None:
        self.loader, self.device, self.amp_dtype = loader, device, amp_dtype
        self.dist_eval, self.print_freq = dist_eval, print_freq

    def __call__(self, model: nn.Module, ema=None) -> dict:
        stats = {f'test_{k}': v for k, v in evaluate(self.loader, model, self.device, self.amp_dtype, self.dist_eval,
                                                     name='model', print_freq=self.print_freq).items()}
        if ema is not None:
            ema_stats = evaluate(self.loader, model.with_student(ema.module), self.device, self.amp_dtype,
                                 self.dist_eval, name='EMA', print_freq=self.print_freq)
            stats.update({f'ema_test_{k}': v for k, v in ema_stats.items()})
        return stats
