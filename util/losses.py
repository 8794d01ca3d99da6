"""Loss objects: the task loss plus whatever the model's forward hands back.

A criterion takes (model outputs, targets) and returns (total loss, named terms). The engine only
sums and logs the terms; which terms exist is decided here, by the objects main_finetune builds.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

Tensor = torch.Tensor


def build_task_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    """MAE's choice: soft-target CE under mixup/cutmix (which smooth the labels themselves), else
    label-smoothing CE, else plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class TransferCriterion(nn.Module):
    """Task loss on the student's logits plus ``atd_weight`` times the model's transfer loss.

    The model returns logits, or (logits, transfer loss) in distill modes during training.
    """

    def __init__(self, task: nn.Module, atd_weight: float = 3.0) -> None:
        super().__init__()
        self.task = task
        self.atd_weight = atd_weight

    def forward(self, outputs, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, transfer = outputs if isinstance(outputs, tuple) else (outputs, None)
        task = self.task(logits.float(), targets)
        if transfer is None:
            return task, {'loss': task}
        loss = task + self.atd_weight * transfer
        return loss, {'loss': loss, 'loss_task': task, 'loss_atd': transfer}
