"""Per-iteration learning rate: linear warmup, then a half-cycle cosine down to ``min_lr`` (MAE), or a
step schedule that multiplies the lr by ``step_rate`` from each of ``step_epochs`` on (the Attention
Probe reference: x0.1 at epochs 200 and 300). Step epochs count from 1, as the reference's loop does:
``step_epochs=[200]`` trains the 200th epoch (0-based index 199) at the lower lr."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float, sched: str = 'cosine',
          step_epochs: Sequence[float] = (), step_rate: float = 0.1) -> float:
    """The learning rate at a fractional epoch (e.g. ``epoch + step / steps_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if sched == 'step':
        return lr * step_rate ** sum(epoch + 1 >= m for m in step_epochs)
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every group's lr to the schedule's value times the group's ``lr_scale``; returns the base value."""
    value = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs, getattr(args, 'sched', 'cosine'),
                  getattr(args, 'step_epochs', ()), getattr(args, 'step_rate', 0.1))
    for group in optimizer.param_groups:
        group['lr'] = value * group.get('lr_scale', 1.0)
    return value
