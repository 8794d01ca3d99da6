"""Which student layer is paired with which teacher block, and which layers and heads are transferred.

The one owner of the pairing: every pair that compares or transfers layers (attention transfer, feature
distillation, the attention probe) takes its pairs from here, as values, and its loss uses exactly those pairs.

    layer_pairs        student layer -> teacher block: i with i, a shallower student spread over the teacher
                       top to top, or an explicit map such as "0:1,1:3"
    transferred_layers the selected layers (an explicit selection such as "0-17", or the reference's
                       ``end_layer``) that are paired
    parse_heads        the transferred heads of each transferred layer
    probe_pairs        the attention probe's blocks and the student blocks at the same relative depth

Errors are ``ModelArgumentError``s naming the builder argument at fault, in the model's words.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch.nn as nn

from models_families import family_of_model
from models_pair import ModelArgumentError

LayerPairs = tuple[tuple[int, int], ...]  # (student layer, teacher block), the teacher blocks rising


def parse_indices(spec: Union[str, Sequence[int]], count: int, what: str, argument: str) -> list[int]:
    """Sorted distinct indices in [0, count) from ``"0-17"``, ``"0,2,4"``, ``"0-3,8"`` or a sequence of ints;
    ``what`` names them in messages (``layers``, ``heads``)."""
    if isinstance(spec, str):
        indices = []
        for part in spec.split(','):
            part = part.strip()
            try:
                lo, _, hi = part.partition('-')
                lo, hi = int(lo), int(hi) if hi else None
            except ValueError:
                raise ModelArgumentError(f"{spec!r}: cannot read {part!r}; write e.g. '0-17' or '0,2,4'",
                                         argument) from None
            if hi is not None and hi < lo:
                raise ModelArgumentError(f"{spec!r}: the range {part!r} selects no {what[:-1]}; write the lower "
                                         f"index first ('{hi}-{lo}')", argument)
            indices.extend(range(lo, hi + 1) if hi is not None else [lo])
    else:
        indices = [int(i) for i in spec]
    indices = sorted(set(indices))
    if not indices:
        raise ModelArgumentError(f"{spec!r} selects no {what[:-1]}; write e.g. '0-17' or '0,2,4'", argument)
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ModelArgumentError(f"{what} {bad} are outside the {count} {what} 0..{count - 1}", argument)
    return indices


def selected_layers(spec: Union[str, Sequence[int], None], depth: int, end_layer: int = 0) -> list[int]:
    """The selected layer indices: ``spec`` (see parse_indices) or, without one, ``[0, depth + end_layer)`` for
    ``end_layer <= 0``, as the reference selects them."""
    if spec is not None and spec != '':
        return parse_indices(spec, depth, 'layers', 'transfer_layers')
    if end_layer > 0:
        raise ModelArgumentError(f"{end_layer}: must be <= 0, it counts layers from the top (0 = all {depth} layers, "
                                 "-1 = all but the last); to choose layers by index select them explicitly",
                                 'end_layer')
    if depth + end_layer <= 0:
        raise ModelArgumentError(f"{end_layer} leaves no layer of {depth} to transfer; use a value above -{depth} "
                                 "(0 = all)", 'end_layer')
    return list(range(depth + end_layer))


def _read_layer_map(spec: str) -> dict[int, int]:
    pairs: dict[int, int] = {}
    for part in str(spec).split(','):
        try:
            i, j = (int(n) for n in part.split(':'))
        except ValueError:
            raise ModelArgumentError(f"{spec!r}: cannot read {part.strip()!r}; write student:teacher pairs, e.g. "
                                     "0:1,1:3", 'layer_map') from None
        if i in pairs:
            raise ModelArgumentError(f"{spec!r}: student layer {i} is paired twice", 'layer_map')
        pairs[i] = j
    return pairs


def layer_pairs(spec: Union[str, Mapping[int, int], None], student_depth: int, teacher_depth: int) -> dict[int, int]:
    """Student layer -> teacher block. ``spec``: ``"0:1,1:3"`` (student:teacher pairs) or a mapping; without one,
    a student as deep as the teacher (or deeper) pairs block i with block i, and a shallower student is spread
    over the teacher's depth, top layer to top layer: student layer i with teacher block
    round((i + 1) * teacher_depth / student_depth) - 1 (2 of 4: 0:1, 1:3; 4 of 12: 0:2, 1:5, 2:8, 3:11)."""
    if spec is None or spec == '' or (isinstance(spec, Mapping) and not spec):
        if student_depth >= teacher_depth:
            return {i: i for i in range(teacher_depth)}
        return {i: round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)}
    pairs = {int(i): int(j) for i, j in spec.items()} if isinstance(spec, Mapping) else _read_layer_map(spec)
    bad = [f'{i}:{j}' for i, j in pairs.items() if not (0 <= i < student_depth and 0 <= j < teacher_depth)]
    if bad:
        raise ModelArgumentError(f"pairs {', '.join(bad)} name layers outside the student's blocks "
                                 f"0..{student_depth - 1} or the teacher's 0..{teacher_depth - 1}", 'layer_map')
    order = sorted(pairs)
    if any(pairs[a] >= pairs[b] for a, b in zip(order, order[1:])):
        raise ModelArgumentError(f"{spec!r}: the teacher blocks must rise with the student layers (the teacher runs "
                                 "once, bottom to top), e.g. 0:1,1:3", 'layer_map')
    return {i: pairs[i] for i in order}


def transferred_layers(selected: list[int], pairs: Mapping[int, int], explicit: bool) -> list[int]:
    """The transferred student layers: those ``selected`` that are paired with a teacher block; an ``explicit``
    selection of an unpaired layer is an error."""
    unpaired = [i for i in selected if i not in pairs]
    if unpaired and explicit:
        raise ModelArgumentError(f"layers {unpaired} are selected but the layer map pairs them with no teacher "
                                 "block; pair them, or leave them out", 'transfer_layers')
    layers = [i for i in selected if i in pairs]
    if not layers:
        raise ModelArgumentError("the layer map and the selected layers leave no layer to transfer",
                                 'transfer_layers')
    return layers


def resolve_pairing(student_depth: int, teacher_depth: int, layers: Union[str, Sequence[int], None] = None,
                    end_layer: int = 0, layer_map: Union[str, Mapping[int, int], None] = None
                    ) -> tuple[dict[int, int], list[int]]:
    """(every student layer -> its teacher block, the transferred student layers): ``layer_pairs`` of
    ``layer_map``, and the layers selected by ``layers`` / ``end_layer`` over the shallower depth that are paired."""
    pairs = layer_pairs(layer_map, student_depth, teacher_depth)
    selected = selected_layers(layers, min(student_depth, teacher_depth), end_layer)
    return pairs, transferred_layers(selected, pairs, explicit=layers not in (None, ''))


def parse_heads(spec: Union[str, int, Sequence[int], None], num_heads: int) -> Optional[tuple[int, ...]]:
    """The transferred heads of each transferred layer, None for all of them.

    ``spec``: a count ``N`` (the first N heads, ``"2"``), or heads by index with ``,`` and ranges (``"0,2"``,
    ``"4-7"``; one head by index: ``"3-3"``), or a sequence of indices; None or ``''``: every head."""
    if spec is None or spec == '':
        return None
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        count = int(spec)
        if not 1 <= count <= num_heads:
            raise ModelArgumentError(f"{spec}: transfers the first N heads; N must lie in [1, {num_heads}] (the "
                                     f"transferred layers have {num_heads} heads)", 'transfer_heads')
        heads = list(range(count))
    else:
        heads = parse_indices(spec, num_heads, 'heads', 'transfer_heads')
    return None if len(heads) == num_heads else tuple(heads)


def token_mismatches(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Why the teacher's and the student's tokens do not correspond one to one (empty when they do). Maps of
    other patch grids are not resampled and register rows are neither dropped nor mirrored: the student is
    asked for the teacher's grid and prefix tokens, which its own architecture arguments give."""
    problems = []
    t_grid, s_grid = tuple(teacher.patch_embed.grid_size), tuple(student.patch_embed.grid_size)
    if t_grid != s_grid:
        t_patch, s_patch = teacher.patch_embed.patch_size, student.patch_embed.patch_size
        problems.append(f"teacher's patch grid {t_grid[0]}x{t_grid[1]} (patch {t_patch[0]}), student's "
                        f"{s_grid[0]}x{s_grid[1]} (patch {s_patch[0]}): maps pair the tokens one to one, so give the "
                        f"student the teacher's patch size (patch_size={t_patch[0]})")
    t_tokens, s_tokens = prefix_tokens(teacher), prefix_tokens(student)
    if t_tokens != s_tokens:
        problems.append(f"teacher's prefix tokens are {describe_prefix(t_tokens)}, the student's "
                        f"{describe_prefix(s_tokens)}: give the student the teacher's "
                        f"({prefix_arguments(t_tokens, student)})")
    return problems


def prefix_tokens(vit: nn.Module) -> dict[str, int]:
    """A ViT's prefix tokens by kind: class, distillation (DeiT-distilled) and register tokens."""
    cls = int(getattr(vit, 'cls_token', None) is not None)
    dist = int(getattr(vit, 'dist_token', None) is not None)
    return {'class': cls, 'distillation': dist, 'register': vit.num_prefix_tokens - cls - dist}


def describe_prefix(tokens: dict[str, int]) -> str:
    named = [f"{n} {kind}" for kind, n in tokens.items() if n]
    return ', '.join(named) if named else 'none'


def prefix_arguments(tokens: dict[str, int], student: nn.Module) -> str:
    """The student's timm arguments that give it ``tokens``'s prefix tokens."""
    eva = family_of_model(student) is not None and family_of_model(student).name == 'Eva'
    args = [f"class_token={bool(tokens['class'])}", f"{'num_reg_tokens' if eva else 'reg_tokens'}={tokens['register']}"]
    if tokens['distillation']:
        args.append('a DeiT-distilled architecture (deit_*_distilled_*)')
    return ', '.join(args)


def default_probe_blocks(depth: int) -> list[int]:
    """The blocks at 1/3, 2/3 and the end of the depth: 3, 7 and 11 of 12."""
    return sorted({round(depth / 3) - 1, round(2 * depth / 3) - 1, depth - 1})


def relative_depth_blocks(teacher_blocks: Sequence[int], teacher_depth: int, student_depth: int) -> list[int]:
    """Student blocks at the same relative depth as the teacher's (block i ends at (i + 1) / depth)."""
    return [max(round((i + 1) * student_depth / teacher_depth) - 1, 0) for i in teacher_blocks]


def parse_blocks(spec: Union[str, Sequence[int], None], depth: int, default: Sequence[int],
                 argument: str = 'probe_blocks') -> list[int]:
    """Comma-separated block indices (``"3,7,11"``) or a sequence, each in [0, depth); ``default`` without one."""
    if spec is None or spec == '':
        blocks = list(default)
    elif isinstance(spec, str):
        try:
            blocks = [int(b) for b in spec.split(',')]
        except ValueError:
            raise ModelArgumentError(f"{spec!r}: write comma-separated block indices, e.g. 3,7,11", argument) from None
    else:
        blocks = list(spec)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ModelArgumentError(f"blocks {bad} are outside the teacher's blocks 0..{depth - 1}", argument)
    return blocks


def probe_pairs(spec: Union[str, Sequence[int], None], teacher_depth: int, student_depth: int) -> LayerPairs:
    """The attention probe's (student block, teacher block) pairs: the teacher blocks of ``spec`` (default 1/3,
    2/3 and the last) with the student blocks at the same relative depth."""
    teacher_blocks = parse_blocks(spec, teacher_depth, default_probe_blocks(teacher_depth))
    return tuple(zip(relative_depth_blocks(teacher_blocks, teacher_depth, student_depth), teacher_blocks))
