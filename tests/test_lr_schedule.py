"""The learning rate: layer-wise decay with the cosine schedule (MAE's formula), and the step schedule of
probe mode (the reference's loop)."""
import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY

from models_vit import create_vit
from util.lr_decay import param_groups_lrd
from util.lr_sched import Schedule, adjust_learning_rate, lr_at


def test_layer_wise_lr_decay_matches_formula():
    depth, decay = TINY['depth'], 0.75
    student = create_vit('vit_base_patch16_224', num_classes=3, **TINY)
    optimizer = torch.optim.AdamW(param_groups_lrd(student, 0.05, student.no_weight_decay(), decay))
    args = Schedule(lr=1e-3, min_lr=1e-6, warmup_epochs=1, epochs=5)
    epoch = 2.5
    adjust_learning_rate(optimizer, epoch, args)
    base = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / (5 - 1)))
    num_layers = depth + 1
    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for name in group['names']:
            lr_of[name], wd_of[name] = group['lr'], group['weight_decay']
    for name in lr_of:
        if name.startswith('blocks.'):
            i = int(name.split('.')[1])
            expected = base * decay ** (num_layers - (i + 1))
        elif name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            expected = base * decay ** num_layers
        else:
            expected = base
        assert lr_of[name] == pytest.approx(expected, rel=1e-12), name
    assert wd_of['pos_embed'] == wd_of['cls_token'] == wd_of['blocks.0.norm1.weight'] == 0.0
    assert wd_of['blocks.0.attn.qkv.weight'] == wd_of['head.weight'] == 0.05
    adjust_learning_rate(optimizer, 0.25, args)  # warmup: linear
    assert lr_of and optimizer.param_groups[0]['lr'] / optimizer.param_groups[0]['lr_scale'] == pytest.approx(2.5e-4)


def test_step_schedule():
    args = SimpleNamespace(lr=7.5e-4, min_lr=0.0, warmup_epochs=0, epochs=251, sched='step', step_epochs=[200],
                           step_rate=0.1)
    # 0-based epoch indices; the reference's loop counts from 1, so its 200th epoch (index 199) is stepped down
    for epoch, expected in ((0.0, 7.5e-4), (150.5, 7.5e-4), (198.99, 7.5e-4), (199.0, 7.5e-5), (250.9, 7.5e-5)):
        assert lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.sched, args.step_epochs,
                     args.step_rate) == pytest.approx(expected, rel=1e-12), epoch
    args.step_epochs = [100, 200]
    assert lr_at(210.0, 1.0, 0.0, 0, 251, 'step', [100, 200], 0.1) == pytest.approx(0.01)
    assert lr_at(98.5, 1.0, 0.0, 0, 251, 'step', [100, 200], 0.1) == pytest.approx(1.0)


# ---- moved from test_bad_input.py: an lr floor above the peak ------------------------------------------------------
def test_lr_floor_above_peak_warns_with_numbers_and_fix(floor_run):
    # peak lr = 1e-3 * 8 / 256
    peak = f'{1e-3 * 8 / 256:.2e}'
    assert re.search(rf'WARNING.*--min_lr 2\.00e-03.*above the peak lr {re.escape(peak)}', floor_run.stderr, re.S)
    assert '--accum_iter' in floor_run.stderr and '--lr' in floor_run.stderr
