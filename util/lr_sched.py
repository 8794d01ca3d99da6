"""Per-iteration learning rate: linear warmup, then a half-cycle cosine down to ``min_lr``."""
from __future__ import annotations

import math

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The learning rate at a fractional epoch (e.g. ``epoch + step / steps_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every group's lr to the schedule's value times the group's ``lr_scale``; returns the base value."""
    value = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = value * group.get('lr_scale', 1.0)
    return value
