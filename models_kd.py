"""Knowledge-distillation baselines beside attention transfer: the same teacher-student pair, another loss.

    feature_kd   the student's residual stream after each transferred block regressed onto the teacher's
    logit_kd     the student's class probabilities pulled towards the teacher's soft labels (Hinton et al.;
                 DeiT's soft distillation)

Both train the student alone at evaluation, as ``distill`` does. The teacher runs as timm runs it (eval mode,
no stochastic depth); the student runs timm's own forward (``forward_intermediates`` for the features), with
its own stochastic depth.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from models_dual_vit import DualViT, TransferMode, create_vit, init_class_token
from util.errors import UserError
from util.losses import kd_loss
from util.pretrained import LoadReport

Tensor = torch.Tensor

FEATURE_KD = TransferMode('feature_kd', 'features', 'loss')
LOGIT_KD = TransferMode('logit_kd', 'logits', 'loss')


def residual_stream(vit: VisionTransformer, x: Tensor, layers: Sequence[int], stop_early: bool = False):
    """(final normed tokens or None, the residual stream (B, N, C), prefix tokens first, after each block of
    ``layers``), through timm's ``forward_intermediates``."""
    out = vit.forward_intermediates(x, indices=list(layers), return_prefix_tokens=True, output_fmt='NLC',
                                    intermediates_only=stop_early, stop_early=stop_early, output_dict=True)
    prefix = out.get('image_intermediates_prefix')
    streams = [torch.cat([p, s], dim=1) for p, s in zip(prefix, out['image_intermediates'])] if prefix is not None \
        else list(out['image_intermediates'])
    return out.get('image_features'), streams


def feature_distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Sum over the transferred layers of the mean squared difference of the residual streams (mean over
    batch, tokens and channels), in float32."""
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher))


class FeatureDistillation(DualViT):
    """--mode feature_kd: in training, (student logits, ``feature_distillation_loss`` over the transferred
    layers); the student's width and tokens must equal the teacher's."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer,
                 layers: Union[str, Sequence[int], None] = None, end_layer: int = 0, **kwargs) -> None:
        super().__init__(student, teacher, mode=FEATURE_KD, layers=layers, end_layer=end_layer, **kwargs)

    def _check_compatible(self) -> None:
        t, s = self.teacher, self.student
        t_tokens = t.patch_embed.num_patches + t.num_prefix_tokens
        s_tokens = s.patch_embed.num_patches + s.num_prefix_tokens
        if t.embed_dim != s.embed_dim or t_tokens != s_tokens:
            raise UserError(f"--mode feature_kd regresses the student's residual stream onto the teacher's: their "
                            f"widths and tokens must match (teacher {t.embed_dim} wide, {t_tokens} tokens; student "
                            f"{s.embed_dim} wide, {s_tokens} tokens); give the student the teacher's embed_dim, "
                            "patch size and prefix tokens")

    def with_student(self, student: VisionTransformer) -> FeatureDistillation:
        return FeatureDistillation(student, self.teacher, layers=self.layers, attention_impl=self.attention_impl)

    def forward(self, x: Tensor, drop_path_masks: Optional[list] = None):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            _, t_streams = residual_stream(self.teacher, x, self.layers, stop_early=True)
        features, s_streams = residual_stream(self.student, x, self.layers)
        return self.student.forward_head(features), feature_distillation_loss(s_streams, t_streams)


class LogitDistillation(DualViT):
    """--mode logit_kd: in training, (student logits, ``kd_loss`` of the student's against the teacher's at
    ``temperature``); the teacher needs a classifier head for the task's classes."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, temperature: float = 4.0,
                 **kwargs) -> None:
        super().__init__(student, teacher, mode=LOGIT_KD, layers=[len(teacher.blocks) - 1], **kwargs)
        self._layers = []  # no layer is transferred: only the outputs are compared
        self.temperature = temperature

    def _check_compatible(self) -> None:
        if self.teacher.num_classes != self.student.num_classes:
            raise UserError(f"--mode logit_kd: the teacher has {self.teacher.num_classes} classes, the student "
                            f"{self.student.num_classes}")

    @property
    def last_teacher_layer(self) -> int:
        return len(self.teacher.blocks) - 1

    def load_teacher(self, path: str, use_ema: bool = False, flag: str = '') -> LoadReport:
        report = super().load_teacher(path, use_ema, flag)
        if 'head.weight' not in report.loaded:
            raise UserError(f"{flag or 'teacher'} {path}: --mode logit_kd distils the teacher's class probabilities, "
                            f"but no classifier head for {self.teacher.num_classes} classes was loaded (a pre-training "
                            "checkpoint has none). Give a teacher fine-tuned on this task's classes (--nb_classes must "
                            "match its head)")
        return report

    def with_student(self, student: VisionTransformer) -> LogitDistillation:
        return LogitDistillation(student, self.teacher, self.temperature, attention_impl=self.attention_impl)

    def forward(self, x: Tensor, drop_path_masks: Optional[list] = None):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        return s_logits, kd_loss(s_logits, t_logits, self.temperature)


def build_kd_pair(
        kind: type[DualViT],
        teacher_model: str,
        student_model: Optional[str] = None,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        global_pool: Union[bool, str] = True,
        img_size: int = 224,
        teacher_kwargs: Optional[dict] = None,
        student_kwargs: Optional[dict] = None,
        **kwargs,
) -> DualViT:
    """A ``FeatureDistillation`` or ``LogitDistillation`` pair from timm names, built as build_dual_vit builds
    its pair (the student mirrors the teacher unless ``student_model`` names another; ``kwargs`` go to the
    pair: layers / end_layer, temperature)."""
    teacher_kwargs = dict(teacher_kwargs or {})
    if student_model is None:
        student_kwargs = {**teacher_kwargs, **(student_kwargs or {})}
    common = dict(num_classes=num_classes, global_pool=global_pool, img_size=img_size)
    student = create_vit(student_model or teacher_model, drop_path_rate=drop_path_rate, **common,
                         **(student_kwargs or {}))
    teacher = create_vit(teacher_model, drop_path_rate=0.0, **common, **teacher_kwargs)
    init_class_token(student)
    return kind(student, teacher, **kwargs)
