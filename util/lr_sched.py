"""Per-iteration learning rate: linear warmup, then a half-cycle cosine down to ``min_lr`` (MAE), or a
step schedule that multiplies the lr by ``step_rate`` from each of ``step_epochs`` on (the Attention
Probe reference: x0.1 at epochs 200 and 300). Step epochs count from 1, as the reference's loop does:
``step_epochs=[200]`` trains the 200th epoch (0-based index 199) at the lower lr."""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from util.distributed import is_main_process, log


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float, sched: str = 'cosine',
          step_epochs: Sequence[float] = (), step_rate: float = 0.1) -> float:
    """The learning rate at a fractional epoch (e.g. ``epoch + step / steps_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if sched == 'step':
        return lr * step_rate ** sum(epoch + 1 >= m for m in step_epochs)
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule: the peak ``lr`` (absolute) over ``epochs`` epochs."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    sched: str = 'cosine'
    step_epochs: tuple[float, ...] = ()
    step_rate: float = 0.1

    @classmethod
    def from_args(cls, args, lr: float | None = None, epochs: int | None = None) -> Schedule:
        """The schedule of the flags (--lr, --min_lr, --warmup_epochs, --epochs, --sched, --step_epochs,
        --step_rate), with the peak lr and the epochs given where the run resolved them."""
        return cls(args.lr if lr is None else lr, args.min_lr, args.warmup_epochs,
                   args.epochs if epochs is None else epochs, getattr(args, 'sched', 'cosine'),
                   tuple(getattr(args, 'step_epochs', ())), getattr(args, 'step_rate', 0.1))

    def at(self, epoch: float) -> float:
        return lr_at(epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs, self.sched, self.step_epochs,
                     self.step_rate)


def schedule_change(saved: dict, schedule: Schedule, epoch: float) -> str | None:
    """What a resumed run's schedule changes at ``epoch`` (fractional) against the one its checkpoint's record
    describes (``saved``: its args), in one line; None when the lr there is the same."""
    keys = ('lr', 'min_lr', 'warmup_epochs', 'epochs')
    if not all(k in saved and saved[k] is not None for k in keys):
        return None
    before = Schedule(saved['lr'], saved['min_lr'], saved['warmup_epochs'], saved['epochs'],
                      saved.get('sched', 'cosine'), tuple(saved.get('step_epochs') or ()), saved.get('step_rate', 0.1))
    old, new = before.at(epoch), schedule.at(epoch)
    if before == schedule or abs(old - new) <= 1e-12 * max(abs(old), abs(new), 1e-30):
        return None
    return (f"the lr at the resumed point (epoch {epoch:.2f}) is {new:.3g} under this command's schedule, "
            f"{old:.3g} under the checkpoint's ({schedule.epochs} epochs, peak {schedule.lr:.3g}; it had "
            f"{before.epochs}, peak {before.lr:.3g})")


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, schedule: Schedule) -> float:
    """Set every group's lr to the schedule's value times the group's ``lr_scale``; returns the base value."""
    value = schedule.at(epoch)
    for group in optimizer.param_groups:
        group['lr'] = value * group.get('lr_scale', 1.0)
    return value


def lr_floor_warning(lr: float, min_lr: float, eff_batch_size: int, accum_iter: int) -> str:
    """The warning for a schedule whose floor (--min_lr) is above its peak: the half-cycle cosine then
    rises from the peak towards the floor for the whole run instead of decaying. A recipe's --blr and
    --min_lr are tuned together for its effective batch (the seed's copy recipe: 64 GPUs x 32)."""
    factor = math.floor(min_lr / lr) + 1  # the smallest larger batch whose peak exceeds the floor
    return (f"WARNING: --min_lr {min_lr:.2e} is above the peak lr {lr:.2e} (blr x effective batch "
            f"{eff_batch_size} / 256), so the learning rate rises towards --min_lr for the whole run instead of "
            f"decaying. The recipe was tuned for a larger effective batch: raise it, e.g. --accum_iter "
            f"{accum_iter * factor} (peak {lr * factor:.2e}), or set --lr / --min_lr for this batch size.")


def learning_rate(cfg, world: int) -> float:
    """--lr, else --blr x the effective batch size / 256 (MAE's rule)."""
    eff_batch_size = cfg.batch_size * cfg.accum_iter * world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch_size / 256
    log(f"base lr: {lr * 256 / eff_batch_size:.2e}  actual lr: {lr:.2e}  "
        f"accumulate grad iterations: {cfg.accum_iter}  effective batch size: {eff_batch_size}")
    if cfg.min_lr > lr and is_main_process():
        print(lr_floor_warning(lr, cfg.min_lr, eff_batch_size, cfg.accum_iter), file=sys.stderr, flush=True)
    return lr
