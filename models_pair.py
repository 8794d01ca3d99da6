"""The teacher-student pair: what the training loop, DDP, EMA, checkpointing and evaluation need of one.

    TeacherStudentPair   the declared interface, implemented by models_dual_vit.DualViT (attention transfer,
                         and plain training without a teacher) and models_probe.ProbeDistiller (Attention Probe)

The loop trains ``student`` (DDP reduces its gradients only, the EMA follows it, checkpoints hold it as a
plain timm model) and never ``teacher``, which is frozen and in eval mode. A pair whose student cannot run
without the teacher (copy modes) says so with ``needs_teacher_at_eval``: evaluation then runs the pair, and
checkpoints hold the teacher too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


class ModelArgumentError(ValueError):
    """A model or pair that cannot be built as asked, said in the model's words (no command-line flags: the model
    layer is used from notebooks too). ``argument`` names the builder argument at fault (``layer_map``,
    ``transfer_layers``, ``end_layer``, ``transfer_heads``, ``map_average``, ``probe_blocks``, ``student``,
    ``teacher``): the command line names the flag that set it (util.model_record.flag_errors)."""

    def __init__(self, message: str, argument: str = '') -> None:
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class EvaluationMaps:
    """The teacher's maps averaged over an evaluation set, per transferred student layer ((H, N, N), float32), and
    the set they were averaged over (``source``: the loader, compared by identity) and its image count."""

    maps: Mapping[int, torch.Tensor]
    source: object
    images: int


class TeacherStudentPair(nn.Module, ABC):
    """A trainable student ViT and, beside it, a frozen teacher ViT (None for plain training)."""

    student: VisionTransformer
    teacher: Optional[VisionTransformer]
    evaluation_maps: Optional[EvaluationMaps] = None

    @property
    @abstractmethod
    def needs_teacher_at_eval(self) -> bool:
        """Whether evaluation runs the teacher too (its checkpoints then hold the teacher)."""

    @property
    @abstractmethod
    def layer_pairs(self) -> list[tuple[int, int]]:
        """The (student layer, teacher block) pairs the pair transfers or compares, in the order its loss uses
        them (empty without a teacher)."""

    def describe_layers(self) -> str:
        """The pairs as the start of a run prints them: the student layers alone where each is paired with the
        teacher's block of the same index."""
        pairs = self.layer_pairs
        if all(i == j for i, j in pairs):
            return str([i for i, _ in pairs])
        return ', '.join(f'{i}:{j}' for i, j in pairs) + ' (student:teacher)'

    @property
    @abstractmethod
    def may_leave_student_parameters_unused(self) -> bool:
        """Whether some trainable student parameters get no gradient in a step (DDP must then look for them)."""

    @property
    def needs_evaluation_maps(self) -> bool:
        """Whether evaluation first needs the teacher's maps averaged over the evaluation set (a copy student
        trained with maps averaged over examples: models_dual_vit.DualViT.teacher_map_sums)."""
        return False

    @property
    def training_heads(self) -> dict[str, nn.Module]:
        """Trainable modules beside the student that only its training uses (e.g. the feature term's projector),
        by the name their checkpoint entry has; the optimizer trains them and checkpoints keep them, the student
        alone is what is evaluated and exported."""
        return {}

    @abstractmethod
    def with_student(self, student: VisionTransformer) -> TeacherStudentPair:
        """The same teacher and wiring around another student (the EMA weights, for evaluation)."""

    @abstractmethod
    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the blocks of both models (same losses and gradients up to rounding)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each student block in the backward pass instead of storing its activations."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def train(self, mode: bool = True) -> TeacherStudentPair:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never uses dropout; stochastic depth comes as shared masks
        return self
