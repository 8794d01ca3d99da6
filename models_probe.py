"""Attention Probe distillation (Wang et al., ICASSP 2022): a frozen teacher trained on the target task
and a (usually smaller) student, both timm ViTs, seeing the same unlabelled wild images.

In training, forward returns what ``util.losses.ProbeCriterion`` needs: the student's and teacher's
logits and their block outputs at the paired blocks (models_pairing.probe_pairs); in evaluation, the
student's logits alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from timm.models.vision_transformer import VisionTransformer

from models_attention import forward_with_capture
from models_pair import ModelArgumentError, TeacherStudentPair
from models_pairing import probe_pairs
from models_vit import check_supported

Tensor = torch.Tensor


class ProbeOutputs(NamedTuple):
    student_logits: Tensor
    teacher_logits: Tensor
    student_features: list
    teacher_features: list


class ProbeDistiller(TeacherStudentPair):
    """Teacher (frozen, eval mode, no gradients) and student for probe distillation."""

    needs_teacher_at_eval = False

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer,
                 layer_pairs: Optional[Sequence[tuple[int, int]]] = None) -> None:
        super().__init__()
        check_supported(teacher, 'teacher')
        check_supported(student, 'student')
        self.student, self.teacher = student, teacher
        pairs = probe_pairs(None, len(teacher.blocks), len(student.blocks)) if layer_pairs is None else layer_pairs
        self.student_blocks = [int(i) for i, _ in pairs]
        self.teacher_blocks = [int(j) for _, j in pairs]
        t_tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
        s_tokens = student.patch_embed.num_patches + student.num_prefix_tokens
        if t_tokens != s_tokens or teacher.num_prefix_tokens != student.num_prefix_tokens:
            raise ModelArgumentError(f"the patch probe compares token grids: teacher has {t_tokens} tokens "
                                     f"({teacher.num_prefix_tokens} prefix), student {s_tokens} "
                                     f"({student.num_prefix_tokens} prefix); use the same patch and image size",
                                     'student')
        if teacher.num_classes != student.num_classes:
            raise ModelArgumentError(f"teacher predicts {teacher.num_classes} classes, student "
                                     f"{student.num_classes}", 'teacher')
        teacher.requires_grad_(False)
        teacher.eval()
        self._capture = forward_with_capture

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """(student block, teacher block) pairs of the patch probe."""
        return list(zip(self.student_blocks, self.teacher_blocks))

    may_leave_student_parameters_unused = False

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the student's blocks (its forward alone, at evaluation) and the capturing forward of
        training, which walks both models' blocks."""
        for blk in self.student.blocks:
            blk.compile(**compile_kwargs)
        self._capture = torch.compile(forward_with_capture, **compile_kwargs)

    def with_student(self, student: VisionTransformer) -> ProbeDistiller:
        return ProbeDistiller(student, self.teacher, self.layer_pairs)

    def forward(self, x: Tensor):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            t_logits, _, t_feats = self._capture(self.teacher, x, feature_blocks=self.teacher_blocks)
        s_logits, _, s_feats = self._capture(self.student, x, feature_blocks=self.student_blocks)
        return ProbeOutputs(s_logits, t_logits, [s_feats[b] for b in self.student_blocks],
                            [t_feats[b] for b in self.teacher_blocks])
