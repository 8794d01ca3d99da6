"""What model a run is: a small frozen description, built once, recorded in every checkpoint, and the only thing
a run's model is rebuilt from (as nanoGPT's ``model_args``).

    Architecture          a timm architecture: its name, its arguments, its pooling
    student_architecture  the one rule for the student's architecture: the teacher's unless another is named
    ModelSpec             the run's model: teacher and student architectures, input size, classes, the paired and
                          transferred layers and heads, map averaging, the attention map loss, the input
                          normalisation, the evaluation crop

A ``ModelSpec`` is plain data (``to_record`` / ``from_record`` give the dict a checkpoint holds under
``model_spec``); the pairs built from it (modes.py) take its values and decide nothing themselves.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from models_vit import create_vit, pool_name, resolve_model_name


@dataclass(frozen=True)
class Architecture:
    """A timm architecture: its resolved name, its timm arguments (besides size, classes, pooling and drop path)
    and its pooling (timm's ``global_pool``)."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    global_pool: str = 'avg'

    def label(self) -> str:
        """The architecture in one phrase: ``vit_base_patch16_224 (depth=4 embed_dim=64, avg pooling)``."""
        args = ' '.join(f'{k}={v}' for k, v in self.kwargs.items())
        return f"{self.name} ({args + ', ' if args else ''}{self.global_pool or 'no'} pooling)"

    @classmethod
    def of(cls, name: str, kwargs: Optional[Mapping[str, Any]] = None, global_pool: Union[bool, str] = True
           ) -> Architecture:
        """From a dual, MAE or timm name, its arguments and MAE's or timm's pooling (True: average + fc_norm,
        False: the class token; a ``global_pool`` among the arguments, as timm spells it, is the pooling)."""
        arch, kwargs = resolve_model_name(name), dict(kwargs or {})
        global_pool = kwargs.pop('global_pool', global_pool)  # timm's own spelling among the arguments wins
        return cls(arch, kwargs, pool_name(global_pool, arch))

    def create(self, num_classes: int, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
        """A randomly initialised model of this architecture (nothing downloaded)."""
        return create_vit(self.name, num_classes=num_classes, global_pool=self.global_pool, img_size=img_size,
                          drop_path_rate=drop_path_rate, **self.kwargs)

    def create_meta(self, num_classes: int, img_size: int) -> nn.Module:
        """The model's structure on the meta device (no memory, no initialisation): its depth, heads, patch grid
        and prefix tokens, to resolve and check a pairing before any weight exists."""
        with torch.device('meta'):
            return self.create(num_classes, img_size)


def student_architecture(teacher: Optional[Architecture], student_name: Optional[str], student_kwargs: Mapping,
                         global_pool: Union[bool, str]) -> Architecture:
    """The student's architecture: ``student_name`` with ``student_kwargs`` when a name is given, else the
    teacher's architecture with ``student_kwargs`` on top (the student mirrors its teacher: Qin et al. 2026 show
    that a student without its teacher's components can fall below training from scratch). The one place this is
    decided."""
    if student_name:
        return Architecture.of(student_name, student_kwargs, global_pool)
    if teacher is None:
        raise ValueError("a student needs a name when there is no teacher to mirror")
    return Architecture.of(teacher.name, {**teacher.kwargs, **student_kwargs}, global_pool)


@dataclass(frozen=True)
class ModelSpec:
    """A run's model. ``mode``: the --mode it was trained in; ``pairs``: (student layer, teacher block) of every
    paired layer (the teacher runs in step with them); ``layers``: the transferred (or compared) student layers;
    ``heads``: the transferred heads (None: all); ``transfer_loss``: the loss between attention maps of a mode that
    distils them (models_transfer_losses.TRANSFER_LOSSES; records written before it existed load as ``ce``, the loss
    they used); ``kd_temperature``: logit distillation's temperature; ``feature_layer``: the transferred student
    layer whose tokens the feature term beside the attention term compares (None: no feature term)."""

    mode: str
    student: Architecture
    num_classes: int
    img_size: int
    teacher: Optional[Architecture] = None
    pairs: tuple[tuple[int, int], ...] = ()
    layers: tuple[int, ...] = ()
    heads: Optional[tuple[int, ...]] = None
    map_average: str = 'none'
    share_drop_path: bool = True
    transfer_loss: str = 'ce'
    kd_temperature: Optional[float] = None
    feature_layer: Optional[int] = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    eval_crop_pct: Optional[float] = None

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    @property
    def pair_map(self) -> dict[int, int]:
        return dict(self.pairs)

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """The transferred (student layer, teacher block) pairs."""
        return [(i, self.pair_map[i]) for i in self.layers]

    def to_record(self) -> dict:
        """The plain dict a checkpoint holds (lists and dicts only: it loads with ``weights_only=True``)."""
        record = dataclasses.asdict(self)
        for key in ('student', 'teacher'):
            if record[key] is not None:
                record[key]['kwargs'] = dict(record[key]['kwargs'])
        record['pairs'] = [list(p) for p in self.pairs]
        record['layers'] = list(self.layers)
        record['heads'] = list(self.heads) if self.heads is not None else None
        record['mean'], record['std'] = list(self.mean), list(self.std)
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> ModelSpec:
        values = dict(record)
        for key in ('student', 'teacher'):
            if values.get(key) is not None:
                values[key] = Architecture(**values[key])
        values['pairs'] = tuple(tuple(p) for p in values.get('pairs') or ())
        values['layers'] = tuple(values.get('layers') or ())
        values['heads'] = tuple(values['heads']) if values.get('heads') is not None else None
        values['mean'], values['std'] = tuple(values['mean']), tuple(values['std'])
        return cls(**values)
