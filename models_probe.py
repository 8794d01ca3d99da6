"""Attention Probe distillation (Wang et al., ICASSP 2022): a frozen teacher trained on the target task
and a (usually smaller) student, both timm ViTs, seeing the same unlabelled wild images.

In training, forward returns what ``util.losses.ProbeCriterion`` needs: the student's and teacher's
logits and their block outputs at the paired layers; in evaluation, the student's logits alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from timm.models.vision_transformer import VisionTransformer

from models_dual_vit import check_supported, create_vit, forward_with_capture, init_class_token
from models_pair import TeacherStudentPair
from util.errors import UserError
from util.pretrained import LoadReport, load_pretrained_weights, require_classifier_head

Tensor = torch.Tensor


class ProbeOutputs(NamedTuple):
    student_logits: Tensor
    teacher_logits: Tensor
    student_features: list
    teacher_features: list


def default_probe_blocks(depth: int) -> list[int]:
    """The blocks at 1/3, 2/3 and the end of the depth: 3, 7 and 11 of 12."""
    return sorted({round(depth / 3) - 1, round(2 * depth / 3) - 1, depth - 1})


def match_layers(teacher_blocks: Sequence[int], teacher_depth: int, student_depth: int) -> list[int]:
    """Student blocks at the same relative depth as the teacher's (block i ends at (i + 1) / depth)."""
    return [max(round((i + 1) * student_depth / teacher_depth) - 1, 0) for i in teacher_blocks]


def parse_blocks(spec: Union[str, Sequence[int], None], depth: int, default: Sequence[int]) -> list[int]:
    if spec is None or spec == '':
        blocks = list(default)
    elif isinstance(spec, str):
        try:
            blocks = [int(b) for b in spec.split(',')]
        except ValueError:
            raise UserError(f"--probe_blocks {spec!r}: write comma-separated block indices, e.g. 3,7,11") from None
    else:
        blocks = list(spec)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise UserError(f"--probe_blocks: blocks {bad} are outside the teacher's blocks 0..{depth - 1}")
    return blocks


class ProbeDistiller(TeacherStudentPair):
    """Teacher (frozen, eval mode, no gradients) and student for probe distillation."""

    needs_teacher_at_eval = False

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer,
                 probe_blocks: Union[str, Sequence[int], None] = None) -> None:
        super().__init__()
        check_supported(teacher, 'teacher')
        check_supported(student, 'student')
        self.student, self.teacher = student, teacher
        t_depth, s_depth = len(teacher.blocks), len(student.blocks)
        self.teacher_blocks = parse_blocks(probe_blocks, t_depth, default_probe_blocks(t_depth))
        self.student_blocks = match_layers(self.teacher_blocks, t_depth, s_depth)
        t_tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
        s_tokens = student.patch_embed.num_patches + student.num_prefix_tokens
        if t_tokens != s_tokens or teacher.num_prefix_tokens != student.num_prefix_tokens:
            raise UserError(f"the patch probe compares token grids: teacher has {t_tokens} tokens "
                            f"({teacher.num_prefix_tokens} prefix), student {s_tokens} "
                            f"({student.num_prefix_tokens} prefix); use the same patch and image size")
        if teacher.num_classes != student.num_classes:
            raise UserError(f"teacher predicts {teacher.num_classes} classes, student {student.num_classes}; "
                            "check --nb_classes")
        teacher.requires_grad_(False)
        teacher.eval()
        self._capture = forward_with_capture

    @property
    def layers(self) -> list[tuple[int, int]]:
        """(teacher block, student block) pairs of the patch probe."""
        return list(zip(self.teacher_blocks, self.student_blocks))

    may_leave_student_parameters_unused = False

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the student's blocks (its forward alone, at evaluation) and the capturing forward of
        training, which walks both models' blocks."""
        for blk in self.student.blocks:
            blk.compile(**compile_kwargs)
        self._capture = torch.compile(forward_with_capture, **compile_kwargs)

    def with_student(self, student: VisionTransformer) -> ProbeDistiller:
        return ProbeDistiller(student, self.teacher, self.teacher_blocks)

    def load_teacher(self, path: str, use_ema: bool = False, flag: str = '') -> LoadReport:
        """The target-task teacher, head included: KD needs its predictions."""
        report = load_pretrained_weights(self.teacher, path, use_ema=use_ema, flag=flag)
        require_classifier_head(report, flag or 'checkpoint', path, self.teacher.num_classes,
                                "probe distillation needs the teacher trained on the target task (check --nb_classes)")
        self.teacher.requires_grad_(False)
        return report

    def forward(self, x: Tensor):
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            t_logits, _, t_feats = self._capture(self.teacher, x, feature_blocks=self.teacher_blocks)
        s_logits, _, s_feats = self._capture(self.student, x, feature_blocks=self.student_blocks)
        return ProbeOutputs(s_logits, t_logits, [s_feats[b] for b in self.student_blocks],
                            [t_feats[b] for b in self.teacher_blocks])


def build_probe_distiller(teacher_model: str, student_model: Optional[str], num_classes: int, img_size: int,
                          global_pool: Union[bool, str] = True, drop_path_rate: float = 0.0,
                          probe_blocks: Union[str, Sequence[int], None] = None,
                          teacher_kwargs: Optional[dict] = None, student_kwargs: Optional[dict] = None,
                          teacher_global_pool: Union[bool, str, None] = None) -> ProbeDistiller:
    teacher = create_vit(teacher_model, num_classes=num_classes, img_size=img_size,
                         global_pool=global_pool if teacher_global_pool is None else teacher_global_pool,
                         **(teacher_kwargs or {}))
    student = create_vit(student_model or teacher_model, num_classes=num_classes, img_size=img_size,
                         global_pool=global_pool, drop_path_rate=drop_path_rate, **(student_kwargs or {}))
    init_class_token(student)
    return ProbeDistiller(student, teacher, probe_blocks)
