"""Parameter groups with layer-wise learning-rate decay (ELECTRA / BEiT / MAE).

With ``num_layers = depth + 1``, layer id 0 holds the patch embedding, class / register tokens,
position embedding and pre-norm; block ``i`` has layer id ``i + 1``; everything after the blocks
(final norm, ``fc_norm``, head) has id ``num_layers``. A parameter's lr scale is
``layer_decay ** (num_layers - layer_id)``: block i gets ``layer_decay ** (num_layers - (i + 1))``,
the head 1. No weight decay on 1-D parameters and on the model's ``no_weight_decay()`` names, unless
``decay_all`` (the Attention Probe reference decays every parameter).

timm's ``param_groups_layer_decay`` counts layers from the parameters it finds, which shifts every
scale by one when the final norm is an Identity (global pooling, the default here); this module
keeps MAE's fixed count.

The attention transfer reference groups its dual model's student with ``num_layers = depth`` instead:
block i gets ``layer_decay ** (depth - 1 - i)``, so the last block shares the head's scale 1, and the
embeddings get ``layer_decay ** depth``. ``num_layers`` selects that count (main_finetune.py uses it in
transfer modes; plain training keeps MAE's ``depth + 1``).
"""
from __future__ import annotations

from collections.abc import Collection

import torch.nn as nn

EMBEDDING_NAMES = ('cls_token', 'reg_token', 'pos_embed', 'patch_embed', 'norm_pre')


def layer_id(name: str, num_layers: int) -> int:
    """The layer a parameter of a timm ViT belongs to (see module docstring)."""
    if name.startswith(EMBEDDING_NAMES):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


def param_groups_lrd(
        model: nn.Module,
        weight_decay: float = 0.05,
        no_weight_decay_list: Collection[str] = (),
        layer_decay: float = 0.75,
        num_layers: int | None = None,
        decay_all: bool = False,
) -> list[dict]:
    """AdamW parameter groups of a timm ViT's trainable parameters; each group carries ``lr_scale``.

    ``num_layers``: the count the scales decay from (default MAE's ``depth + 1``; see module docstring).
    ``decay_all``: every parameter decays at ``weight_decay`` (no exemption of 1-D and listed names)."""
    if num_layers is None:
        num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = not decay_all and (param.ndim == 1 or name in no_weight_decay_list)
        lid = layer_id(name, num_layers)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {'lr_scale': layer_decay ** (num_layers - lid),
                           'weight_decay': 0.0 if no_decay else weight_decay, 'params': [], 'names': []}
        groups[key]['params'].append(param)
        groups[key]['names'].append(name)
    return list(groups.values())
