"""Components of a student initialised from its teacher's weights: the named parts of the student are copied from
the teacher, every other tensor keeps the student's own (random) initialisation. With it one can ask which of the
teacher's components, beside its attention, a student needs (Qin et al., 2026, study the components of the
teacher's architecture a student needs).

    COMPONENTS          each component's name and the tensors it stands for
    parse_components    "norm,qk" -> ('norm', 'qk'), unknown names refused
    component_parts     the (student tensor, teacher tensor, rows) of the named components, checked to fit
    copy_parts          copy them into the student
    describe_parts      what was copied, in one line

Block tensors are taken from the teacher block each student block is paired with (the run's pairing: block i with
block i unless the student is shallower or a layer map says otherwise). Errors are ``ModelArgumentError``s naming
the argument ``init_from_teacher``, in the model's words.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from models_pair import ModelArgumentError

ARGUMENT = 'init_from_teacher'
# name -> the tensors it stands for (timm's names; Eva's separate q/k/v projections and Beit's q/v biases too)
COMPONENTS: dict[str, str] = {
    'patch_embed': 'the patch embedding: patch_embed.* (its projection, and its norm where the model has one)',
    'pos_embed': 'the position embedding: pos_embed',
    'cls_token': 'the class token: cls_token',
    'reg_token': 'the register tokens: reg_token',
    'norm': "every block's two pre-norms: blocks.N.norm1.*, blocks.N.norm2.*",
    'qk': "the query and key projections: the q and k rows of blocks.N.attn.qkv.weight and .bias (its first two "
          "thirds), blocks.N.attn.q_norm.* and k_norm.* (qk-norm), and Eva's q_proj, k_proj, Beit's q_bias",
    'v': "the value projection: the v rows of blocks.N.attn.qkv.weight and .bias (its last third), and Eva's v_proj, "
         "Beit's v_bias",
    'proj': "the attention's output projection: blocks.N.attn.proj.*",
    'mlp': "every block's MLP: blocks.N.mlp.*",
}
_BLOCK = re.compile(r'blocks\.(\d+)\.(.+)')
# the thirds (first, last) of a fused qkv projection's rows that a component takes
_QKV_THIRDS = {'qk': (0, 2), 'v': (2, 3)}
_WHOLE = {
    'patch_embed': re.compile(r'patch_embed\..+'),
    'pos_embed': re.compile(r'pos_embed'),
    'cls_token': re.compile(r'cls_token'),
    'reg_token': re.compile(r'reg_token'),
    'norm': re.compile(r'blocks\.\d+\.norm[12]\..+'),
    'qk': re.compile(r'blocks\.\d+\.attn\.(?:[qk]_norm\..+|[qk]_proj\..+|q_bias)'),
    'v': re.compile(r'blocks\.\d+\.attn\.(?:v_proj\..+|v_bias)'),
    'proj': re.compile(r'blocks\.\d+\.attn\.proj\..+'),
    'mlp': re.compile(r'blocks\.\d+\.mlp\..+'),
}
_QKV = re.compile(r'blocks\.\d+\.attn\.qkv\.(weight|bias)')


@dataclass(frozen=True)
class Part:
    """One copied tensor: the student's ``student`` from the teacher's ``teacher``; ``rows``: (start, stop) of the
    first dimension when only those rows are copied (the q, k or v thirds of a fused qkv), None for the whole."""

    component: str
    student: str
    teacher: str
    rows: Optional[tuple[int, int]] = None

    def label(self) -> str:
        return self.student + (f'[{self.rows[0]}:{self.rows[1]}]' if self.rows else '')


def parse_components(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The component names of ``"norm,qk"`` (or a sequence of names), in the order of COMPONENTS."""
    names = [n.strip() for n in spec.split(',')] if isinstance(spec, str) else [str(n) for n in spec]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise ModelArgumentError(f"{', '.join(map(repr, unknown)) or 'nothing'}: not a component; name one or more "
                                 f"of {', '.join(COMPONENTS)}, separated by commas (e.g. norm,qk)", ARGUMENT)
    return tuple(n for n in COMPONENTS if n in names)


def _teacher_key(key: str, pairs: Mapping[int, int]) -> str:
    """The teacher's tensor name for a student's: a block's tensor from the block it is paired with."""
    match = _BLOCK.fullmatch(key)
    if match is None:
        return key
    block = int(match.group(1))
    if block not in pairs:
        raise ModelArgumentError(f"student block {block} is paired with no teacher block, so it has no teacher "
                                 "tensors to start from: pair it, or leave the block components out", ARGUMENT)
    return f'blocks.{pairs[block]}.{match.group(2)}'


def _parts_of(component: str, key: str, value: torch.Tensor, pairs: Mapping[int, int]) -> list[Part]:
    if _WHOLE[component].fullmatch(key):
        return [Part(component, key, _teacher_key(key, pairs))]
    if component in _QKV_THIRDS and _QKV.fullmatch(key):
        third, (first, last) = value.shape[0] // 3, _QKV_THIRDS[component]
        return [Part(component, key, _teacher_key(key, pairs), (first * third, last * third))]
    return []


def component_parts(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                    components: Sequence[str], pairs: Mapping[int, int]) -> list[Part]:
    """The parts of the named ``components`` in the student's state dict, each with the teacher's tensor it is
    copied from (``pairs``: student block -> teacher block). Raises ModelArgumentError for a component the student
    has no tensors of, a tensor the teacher lacks, and shapes that differ (a student of another width)."""
    parts = []
    for component in components:
        found = [part for key, value in student.items() for part in _parts_of(component, key, value, pairs)]
        if not found:
            raise ModelArgumentError(f"{component}: the student has no such tensors ({COMPONENTS[component]}); "
                                     "leave it out", ARGUMENT)
        parts += found
    for part in parts:
        if part.teacher not in teacher:
            raise ModelArgumentError(f"{part.component}: the teacher has no {part.teacher} for the student's "
                                     f"{part.student} (another family's layout); leave {part.component} out",
                                     ARGUMENT)
        ours, theirs = tuple(student[part.student].shape), tuple(teacher[part.teacher].shape)
        if ours != theirs:
            raise ModelArgumentError(f"{part.component}: the student's {part.student} is {ours} and the teacher's "
                                     f"{part.teacher} is {theirs} (a student of another width or size cannot take "
                                     f"it); leave {part.component} out, or give the student the teacher's "
                                     "architecture", ARGUMENT)
    return parts


def copy_parts(student: nn.Module, teacher: nn.Module, parts: Sequence[Part]) -> None:
    """Copy every part's teacher tensor (or its rows) into the student's tensor, in place."""
    own, source = student.state_dict(), teacher.state_dict()  # tensors sharing the parameters' storage
    with torch.no_grad():
        for part in parts:
            rows = slice(*part.rows) if part.rows else slice(None)
            own[part.student][rows].copy_(source[part.teacher][rows])


def _indices(blocks: list[int]) -> str:
    """0,1,2,3,5 -> '0-3,5'."""
    runs, start = [], blocks[0]
    for prev, cur in zip(blocks, blocks[1:] + [None]):
        if cur != prev + 1:
            runs.append(f'{start}-{prev}' if prev > start else f'{start}')
            start = cur
    return ','.join(runs)


def describe_parts(parts: Sequence[Part], total: int) -> str:
    """The copied tensors in one line: block tensors grouped over their blocks (``blocks.[0-23].norm1.weight``),
    with the teacher's blocks where they are others; ``total``: the student's tensor count."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for part in parts:
        match, source = _BLOCK.fullmatch(part.label()), _BLOCK.fullmatch(part.teacher)
        if match is None:
            groups[part.label()] = ([], [])
            continue
        blocks, teacher_blocks = groups.setdefault(match.group(2), ([], []))
        blocks.append(int(match.group(1)))
        teacher_blocks.append(int(source.group(1)))
    names = []
    for rest, (blocks, teacher_blocks) in groups.items():
        if not blocks:
            names.append(rest)
            continue
        name = f'blocks.[{_indices(blocks)}].{rest}'
        names.append(name if blocks == teacher_blocks else f'{name} (from teacher blocks {_indices(teacher_blocks)})')
    whole = len({p.student for p in parts if p.rows is None})
    rows = len({p.student for p in parts if p.rows is not None})
    counted = f"{whole} tensors" + (f" and the rows of {rows} more" if rows else '')
    return (f"{counted} copied from the teacher: {', '.join(names)}; the other {total - whole - rows} of the "
            f"student's {total} tensors keep their initialisation")
