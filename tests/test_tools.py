"""Using what was trained: export to a standalone timm model, attention diagnostics, ensembles."""
import csv
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from helpers import make_image_folder, make_teacher_checkpoint, tiny_args
from PIL import Image

import main_finetune
from tools import export_student, visualize_attention
from util.datasets import build_transform
from util.pretrained import read_checkpoint


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('use')
    data = make_image_folder(str(root / 'data'))
    teacher = make_teacher_checkpoint(str(root / 'teacher.pth'))
    out = {}
    for mode in ('distill', 'copy'):
        out[mode] = str(root / mode)
        main_finetune.run(tiny_args(data, out[mode], '--mode', mode, '--finetune', teacher, '--lr', '3e-3',
                                    '--ema', '0.5', epochs=1))
    return SimpleNamespace(root=root, data=data, teacher=teacher, out=out)


def dual_model_from(checkpoint):
    ckpt = read_checkpoint(checkpoint)
    args = main_finetune.get_args_parser().parse_args([])
    vars(args).update(ckpt['args'])
    model = main_finetune.build_model(args)
    model.student.load_state_dict(ckpt['model'])
    model.teacher.load_state_dict(torch.load(args.finetune)['model'])
    return model.eval(), ckpt


# ---- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('ema', [False, True])
def test_exported_student_loads_with_timm_alone_and_matches(runs, tmp_path, ema):
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    export_dir = str(tmp_path / 'exported')
    info = export_student.export(checkpoint, export_dir, use_ema=ema)
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    script = textwrap.dedent(f"""
        import torch, timm
        x = torch.load({str(tmp_path / 'x.pt')!r})
        a = timm.create_model('local-dir:{export_dir}', pretrained=True).eval()
        b = timm.create_model({info['architecture']!r}, pretrained=True, num_classes={info['num_classes']},
                              pretrained_cfg_overlay=dict(file={export_dir + '/model.safetensors'!r},
                                                          num_classes={info['num_classes']}),
                              **{info['model_args']!r}).eval()
        with torch.no_grad():
            torch.save((a(x), b(x)), {str(tmp_path / 'out.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local_dir, overlay = torch.load(tmp_path / 'out.pt')

    model, ckpt = dual_model_from(checkpoint)
    if ema:
        model.student.load_state_dict(ckpt['model_ema'])
    with torch.no_grad():
        inside = model(x)
    torch.testing.assert_close(local_dir, inside, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(overlay, inside, rtol=1e-6, atol=1e-6)


def test_copy_student_export_is_refused_with_the_reason(runs, tmp_path):
    with pytest.raises(export_student.ExportError, match="cannot run without the teacher. Train with --mode distill"):
        export_student.export(os.path.join(runs.out['copy'], 'checkpoint.pth'), str(tmp_path / 'x'))
    assert not (tmp_path / 'x').exists()


# ---- diagnostics ---------------------------------------------------------------------------------
def reference_maps(vit, x):
    """Attention probabilities of every layer from the raw qkv weights, via hooks on norm1."""
    inputs = {}
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o, k=k: inputs.__setitem__(k, o))
             for k, blk in enumerate(vit.blocks)]
    with torch.no_grad():
        vit(x)
    for h in hooks:
        h.remove()
    maps = {}
    for k, blk in enumerate(vit.blocks):
        h, attn = inputs[k], blk.attn
        B, N, _ = h.shape
        qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).view(B, N, 3, attn.num_heads, attn.head_dim)
        q, kk = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        maps[k] = (q @ kk.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
    return maps


def test_attention_diagnostics_match_independent_computation(runs, tmp_path):
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    out = str(tmp_path / 'diag')
    visualize_attention.main(['--checkpoint', checkpoint, '--data_path', runs.data, '--output_dir', out,
                              '--num_show', '2', '--batch_size', '7', '--num_workers', '0'])
    files = sorted(os.listdir(out))
    assert {'attention_metrics.csv', 'attention_metrics.png', 'cls_attention_0.png', 'cls_attention_1.png',
            'token_maps_0_layer0.png', 'token_maps_1_layer3.png'} <= set(files)
    with open(os.path.join(out, 'attention_metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [int(r['layer']) for r in rows] == [0, 1, 2, 3]

    model, _ = dual_model_from(checkpoint)
    # the run's evaluation transform: its 32x32 images at --input_size 32 are evaluated uncropped
    assert read_checkpoint(checkpoint)['args']['eval_crop_pct'] == 1.0
    transform = build_transform(False, SimpleNamespace(input_size=32, eval_crop_pct=1.0))
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(runs.data, 'val')) for f in fs)
    x = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
    layer = 2
    t, s = reference_maps(model.teacher, x)[layer], reference_maps(model.student, x)[layer]
    m = (t + s) / 2
    ce = -(t * s.log()).sum(-1).mean()
    jsd = (0.5 * (t * (t / m).log()).sum(-1) + 0.5 * (s * (s / m).log()).sum(-1)).mean()
    entropy_t = -(t * t.log()).sum(-1).mean()
    coords = torch.tensor([(r * 8.0, c * 8.0) for r in range(4) for c in range(4)])
    dist = ((coords[:, None] - coords[None]) ** 2).sum(-1).sqrt()
    pt = s[:, :, 1:, 1:] / s[:, :, 1:, 1:].sum(-1, keepdim=True)
    distance_s = (pt * dist).sum(-1).mean()
    row = rows[layer]
    for key, expected in (('teacher_student_ce', ce), ('jsd', jsd), ('teacher_entropy', entropy_t),
                          ('student_distance_px', distance_s)):
        assert float(row[key]) == pytest.approx(expected.item(), rel=1e-4), key


# ---- ensembles -----------------------------------------------------------------------------------
def test_ensemble_of_a_model_with_itself_equals_the_model(runs):
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', checkpoint, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    for key in ('acc1', 'acc5', 'loss'):
        assert stats[f'ensemble_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)
        assert stats[f'other_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)


def test_ensemble_with_a_plain_classifier_checkpoint(runs):
    """The paper's case: the distilled student beside the (fine-tuned) teacher, a checkpoint without args."""
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', runs.teacher, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    assert {'test_acc1', 'other_test_acc1', 'ensemble_test_acc1'} <= set(stats)
    assert stats['ensemble_test_images'] == 18
