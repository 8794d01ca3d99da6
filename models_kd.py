"""Knowledge-distillation baselines beside attention transfer: the same teacher beside the student, another loss.

    FeatureDistillation  the student's residual stream after each paired layer regressed onto the teacher's
                         residual stream after the block it is paired with
    LogitDistillation    the student's class probabilities pulled towards the teacher's soft labels (Hinton et al.;
                         DeiT's soft distillation)

Both train the student alone at evaluation, as ``distill`` does. The teacher runs as timm runs it (eval mode,
no stochastic depth); the student runs timm's own forward (``forward_intermediates`` for the features), with
its own stochastic depth.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from models_pair import ModelArgumentError, TeacherStudentPair
from util.losses import kd_loss

Tensor = torch.Tensor


def residual_stream(vit: VisionTransformer, x: Tensor, layers: Sequence[int], stop_early: bool = False):
    """(final normed tokens or None, the residual stream (B, N, C), prefix tokens first, after each block of
    ``layers`` in that order), through timm's ``forward_intermediates``."""
    out = vit.forward_intermediates(x, indices=sorted(layers), return_prefix_tokens=True, output_fmt='NLC',
                                    intermediates_only=stop_early, stop_early=stop_early, output_dict=True)
    prefix = out.get('image_intermediates_prefix')
    streams = [torch.cat([p, s], dim=1) for p, s in zip(prefix, out['image_intermediates'])] if prefix is not None \
        else list(out['image_intermediates'])
    by_block = dict(zip(sorted(layers), streams))
    return out.get('image_features'), [by_block[i] for i in layers]


def feature_distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Sum over the paired layers of the mean squared difference of the residual streams (mean over batch,
    tokens and channels), in float32."""
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher))


class _FrozenTeacherPair(TeacherStudentPair):
    """A student beside a frozen teacher that evaluation does not need (the baselines)."""

    needs_teacher_at_eval = False
    may_leave_student_parameters_unused = False

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        teacher.requires_grad_(False)
        teacher.eval()

    def compile_blocks(self, **compile_kwargs) -> None:
        for vit in (self.student, self.teacher):
            for blk in vit.blocks:
                blk.compile(**compile_kwargs)


class FeatureDistillation(_FrozenTeacherPair):
    """In training, (student logits, ``feature_distillation_loss`` of the student's residual stream after each
    layer of ``layer_pairs`` against the teacher's after the block it is paired with); the student's width and
    tokens must equal the teacher's."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer,
                 layer_pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__(student, teacher)
        self._pairs = [(int(i), int(j)) for i, j in layer_pairs]
        t_tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
        s_tokens = student.patch_embed.num_patches + student.num_prefix_tokens
        if teacher.embed_dim != student.embed_dim or t_tokens != s_tokens:
            raise ModelArgumentError(
                f"feature distillation regresses the student's residual stream onto the teacher's: their widths and "
                f"tokens must match (teacher {teacher.embed_dim} wide, {t_tokens} tokens; student {student.embed_dim} "
                f"wide, {s_tokens} tokens); give the student the teacher's embed_dim, patch size and prefix tokens",
                'student')
        if not self._pairs:
            raise ModelArgumentError("feature distillation needs at least one paired layer", 'transfer_layers')

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return list(self._pairs)

    def with_student(self, student: VisionTransformer) -> FeatureDistillation:
        return FeatureDistillation(student, self.teacher, self._pairs)

    def forward(self, x: Tensor):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            _, t_streams = residual_stream(self.teacher, x, [j for _, j in self._pairs], stop_early=True)
        features, s_streams = residual_stream(self.student, x, [i for i, _ in self._pairs])
        return self.student.forward_head(features), feature_distillation_loss(s_streams, t_streams)


class LogitDistillation(_FrozenTeacherPair):
    """In training, (student logits, ``kd_loss`` of the student's against the teacher's at ``temperature``); the
    teacher needs a classifier head for the task's classes."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, temperature: float = 4.0) -> None:
        super().__init__(student, teacher)
        if teacher.num_classes != student.num_classes:
            raise ModelArgumentError(f"logit distillation: the teacher has {teacher.num_classes} classes, the student "
                                     f"{student.num_classes}", 'teacher')
        self.temperature = temperature

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return []  # only the outputs are compared

    def with_student(self, student: VisionTransformer) -> LogitDistillation:
        return LogitDistillation(student, self.teacher, self.temperature)

    def forward(self, x: Tensor, drop_path_masks: Optional[list] = None):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        return s_logits, kd_loss(s_logits, t_logits, self.temperature)
