"""Fidelity to what the authors ran (issue 12): each test compares with a computation written here
from the stated rule, not with the code under test."""
from types import SimpleNamespace

import pytest
import torch

import main_finetune
from models_dual_vit import build_dual_vit

ARCH = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


# ---- layer-wise lr decay: the reference's grouping in transfer modes, MAE's in plain training ----------
# Exponent of layer_decay per parameter-name prefix, written out for a 4-block student.
# Transfer modes (the reference's dual-model grouping, num_layers = depth = 4): block i -> 4 - 1 - i,
# the last block and the head 0, embeddings 4. Plain (MAE, num_layers = depth + 1 = 5): block i -> 4 - i,
# the head 0, embeddings 5.
TRANSFER_EXPONENTS = {'cls_token': 4, 'pos_embed': 4, 'patch_embed.': 4, 'blocks.0.': 3, 'blocks.1.': 2,
                      'blocks.2.': 1, 'blocks.3.': 0, 'fc_norm.': 0, 'head.': 0}
PLAIN_EXPONENTS = {'cls_token': 5, 'pos_embed': 5, 'patch_embed.': 5, 'blocks.0.': 4, 'blocks.1.': 3,
                   'blocks.2.': 2, 'blocks.3.': 1, 'fc_norm.': 0, 'head.': 0}


@pytest.mark.parametrize('mode,table', [('copy', TRANSFER_EXPONENTS), ('distill', TRANSFER_EXPONENTS),
                                        (None, PLAIN_EXPONENTS)])
def test_layer_decay_scales_per_parameter_name(mode, table):
    decay = 0.75
    model = build_dual_vit('vit_base_patch16_224' if mode else None, 'vit_base_patch16_224', mode=mode,
                           num_classes=3, img_size=32, teacher_kwargs=ARCH, student_kwargs=ARCH)
    args = SimpleNamespace(mode=mode, weight_decay=0.05, layer_decay=decay)
    scale = {name: g['lr_scale'] for g in main_finetune.param_groups(model, args) for name in g['names']}
    assert set(scale) == {n for n, _ in model.student.named_parameters()}
    for name, value in scale.items():
        prefix = next(p for p in table if name.startswith(p))
        assert value == pytest.approx(decay ** table[prefix], rel=1e-12), name


# ---- the student's class token: std 0.02 in transfer modes (the reference), timm's 1e-6 otherwise ------
@pytest.mark.parametrize('mode', ['copy', 'distill', None])
def test_student_class_token_initialisation(mode):
    torch.manual_seed(0)
    arch = dict(patch_size=16, embed_dim=768, depth=1, num_heads=12)
    model = build_dual_vit('vit_base_patch16_224' if mode else None, 'vit_base_patch16_224', mode=mode,
                           num_classes=3, img_size=32, teacher_kwargs=arch, student_kwargs=arch)
    token = model.student.cls_token.detach().flatten()
    if mode is None:
        assert token.abs().max() < 1e-4  # timm's own
    else:  # truncated normal, std 0.02 (truncated at +-2 absolute, i.e. not at all at this scale)
        assert 0.017 < token.std().item() < 0.023 and token.abs().mean().item() > 0.01
