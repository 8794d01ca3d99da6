"""Loss objects: the task loss plus whatever the model's forward hands back.

A criterion takes (model outputs, targets) and returns (total loss, named terms). The engine only
sums and logs the terms; which terms exist is decided here, by the objects main_finetune builds.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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


def transfer_weight(weight: float, until: float | None, decay: str, epoch: float) -> float:
    """The transfer loss's weight at ``epoch`` (fractional, counted from 0) under --transfer_until ``until``:
    ``weight`` throughout without one; ``step``: ``weight`` before ``until``, 0 from it on; ``linear``:
    ``weight * max(0, 1 - epoch / until)``."""
    if until is None:
        return weight
    if decay == 'linear':
        return weight * max(0.0, 1.0 - epoch / until)
    return weight if epoch < until else 0.0


class TransferCriterion(nn.Module):
    """Task loss on the student's logits plus ``atd_weight`` times the model's transfer loss.

    The model returns logits, or (logits, transfer loss) in distill modes during training; ``term`` names the
    transfer loss in the logs (``loss_atd``: attention distillation; the baselines' own names). With ``until``
    (--transfer_until) the weight follows ``transfer_weight`` at the position ``set_progress`` was last given. A
    model that returns (logits, transfer loss, feature loss) adds ``feature_weight`` times the feature loss
    (``loss_feature_align`` in the logs), on the same schedule.
    """

    def __init__(self, task: nn.Module, atd_weight: float = 3.0, until: float | None = None,
                 decay: str = 'step', term: str = 'loss_atd', feature_weight: float = 0.0) -> None:
        super().__init__()
        self.task, self.term = task, term
        self.atd_weight, self.feature_weight = atd_weight, feature_weight
        self.until, self.decay, self.epoch = until, decay, 0.0

    def set_progress(self, epoch: float) -> None:
        """The training position in epochs (fractional), which the transfer weight follows."""
        self.epoch = epoch

    def forward(self, outputs, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, transfer, *features = outputs if isinstance(outputs, tuple) else (outputs, None)
        task = self.task(logits.float(), targets)
        if transfer is None:
            return task, {'loss': task}
        weight = transfer_weight(self.atd_weight, self.until, self.decay, self.epoch)
        loss = task + weight * transfer
        terms = {'loss_task': task, self.term: transfer}
        if features:
            loss = loss + transfer_weight(self.feature_weight, self.until, self.decay, self.epoch) * features[0]
            terms['loss_feature_align'] = features[0]
        terms = {'loss': loss, **terms}
        if self.until is not None:
            terms['atd_weight'] = task.new_tensor(weight)
        return loss, terms


# ---------------------------------------------------------------------------------------------
# Attention Probe distillation (Wang et al., ICASSP 2022)
# ---------------------------------------------------------------------------------------------
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
            sample_weights: Tensor | None = None) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, averaged over the batch; with
    ``sample_weights`` each sample's term is scaled first (the robust variant)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    per_sample = F.kl_div(log_p, q, reduction='none').sum(dim=1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.sum() / student_logits.shape[0] * temperature ** 2


def noise_transition_matrix(params: Tensor, teacher_acc: float) -> Tensor:
    """DFND's class transition matrix: ``teacher_acc`` on the diagonal, each row's off-diagonal entries
    ``softmax(params[row]) * (1 - teacher_acc)``; every row sums to one. ``params`` is (K, K - 1)."""
    k = params.shape[0]
    off = F.softmax(params, dim=1) * (1.0 - teacher_acc)
    matrix = params.new_full((k, k), teacher_acc)
    mask = ~torch.eye(k, dtype=torch.bool, device=params.device)
    return matrix.masked_scatter(mask, off)


def patch_attention_probe_loss(teacher_features: list[Tensor], student_features: list[Tensor],
                               num_prefix_tokens: int = 1, normalize: str = 'tokens') -> Tensor:
    """MSE between teacher and student patch attention probes, averaged over layers, batch and patches.

    Per layer, the features (B, N, C) are L2-normalised along the token axis (``tokens``, the
    reference's choice) or the channel axis (``channels``); the probe is the class token's row of
    their token-by-token similarity ``F F^T`` over the patch tokens. Widths may differ; N may not.
    """
    dim = {'tokens': 1, 'channels': 2}[normalize]
    total = 0.0
    for t, s in zip(teacher_features, student_features):
        t = F.normalize(t.float(), p=2, dim=dim)
        s = F.normalize(s.float(), p=2, dim=dim)
        t_probe = (t[:, :1] @ t.transpose(1, 2))[:, 0, num_prefix_tokens:]
        s_probe = (s[:, :1] @ s.transpose(1, 2))[:, 0, num_prefix_tokens:]
        total = total + F.mse_loss(s_probe, t_probe)
    return total / len(teacher_features)


class ProbeCriterion(nn.Module):
    """Probe distillation's loss on unlabelled images: KD (optionally class-weighted), the noise
    adaptation NLL against the teacher's prediction, and ``patchattn`` times the patch probe loss.

    The noise adaptation parameters live here and train with their own optimizer (Adam, 1e-3).
    """

    def __init__(self, num_classes: int, temperature: float = 4.0, patchattn: float = 0.8,
                 noise_adaptation: bool = True, teacher_acc: float = 0.9, class_weights: Tensor | None = None,
                 num_prefix_tokens: int = 1, probe_norm: str = 'tokens') -> None:
        super().__init__()
        self.temperature, self.patchattn, self.teacher_acc = temperature, patchattn, teacher_acc
        self.num_prefix_tokens, self.probe_norm = num_prefix_tokens, probe_norm
        self.noise_params = nn.Parameter(torch.zeros(num_classes, num_classes - 1)) if noise_adaptation else None
        self.register_buffer('class_weights', class_weights, persistent=False)

    def forward(self, outputs, targets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        s_logits, t_logits, s_features, t_features = outputs
        prediction = t_logits.argmax(dim=1)
        weights = self.class_weights[prediction] if self.class_weights is not None else None
        kd = kd_loss(s_logits, t_logits, self.temperature, weights)
        loss, terms = kd, {'loss_kd': kd}
        if self.noise_params is not None:
            transition = noise_transition_matrix(self.noise_params, self.teacher_acc)
            adapted = F.softmax(s_logits.float(), dim=1) @ transition
            nll = F.nll_loss(torch.log(adapted.clamp_min(1e-12)), prediction)
            loss, terms['loss_noise'] = loss + nll, nll
        if self.patchattn > 0:
            probe = patch_attention_probe_loss(t_features, s_features, self.num_prefix_tokens, self.probe_norm)
            loss, terms['loss_probe'] = loss + self.patchattn * probe, probe
        return loss, {'loss': loss, **terms}
