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
from typing import Optional

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from util.pretrained import LoadReport


class TeacherStudentPair(nn.Module, ABC):
    """A trainable student ViT and, beside it, a frozen teacher ViT (None for plain training)."""

    student: VisionTransformer
    teacher: Optional[VisionTransformer]

    @property
    @abstractmethod
    def needs_teacher_at_eval(self) -> bool:
        """Whether evaluation runs the teacher too (its checkpoints then hold the teacher)."""

    @property
    @abstractmethod
    def layers(self) -> list:
        """The layers the pair transfers or compares (empty without a teacher), for the start-up line."""

    def describe_layers(self) -> str:
        """The layers as the start of a run prints them."""
        return str(self.layers)

    @property
    @abstractmethod
    def may_leave_student_parameters_unused(self) -> bool:
        """Whether some trainable student parameters get no gradient in a step (DDP must then look for them)."""

    @abstractmethod
    def with_student(self, student: VisionTransformer) -> TeacherStudentPair:
        """The same teacher and wiring around another student (the EMA weights, for evaluation)."""

    @abstractmethod
    def load_teacher(self, path: str, use_ema: bool = False, flag: str = '') -> LoadReport:
        """The teacher's pre-trained weights from a checkpoint or a name (util.pretrained's loaders)."""

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
