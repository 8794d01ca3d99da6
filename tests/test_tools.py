"""The tools: tools/export_student.py (a standalone timm model), tools/visualize_attention.py (attention
diagnostics against an independent computation), and the data preparation tools on generated CIFAR pickles
and a generated Tiny-ImageNet tree."""
import csv
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import DATA_DEFAULTS, TINY_ARCH
from PIL import Image

from models_vit import create_vit
from modes import get_mode
from tools import export_student, prepare_cifar, prepare_tinyimagenet, visualize_attention
from util.datasets import build_dataset, build_transform, eval_transform
from util.errors import UserError
from util.model_record import recorded_spec
from util.pretrained import read_checkpoint


def dual_model_from(checkpoint):
    ckpt = read_checkpoint(checkpoint)
    spec = recorded_spec(ckpt)
    model = get_mode(spec.mode).build_model(spec)
    model.student.load_state_dict(ckpt['model'])
    model.teacher.load_state_dict(torch.load(ckpt['args']['finetune'])['model'])
    return model.eval(), ckpt


# ---- export ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('ema', [False, True])
def test_exported_student_loads_with_timm_alone_and_matches(one_epoch_runs, tmp_path, ema):
    checkpoint = os.path.join(one_epoch_runs.out['distill'], 'checkpoint.pth')
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


def test_copy_student_export_is_refused_with_the_reason(one_epoch_runs, tmp_path):
    with pytest.raises(export_student.ExportError, match="cannot run without the teacher. Train with --mode distill"):
        export_student.export(os.path.join(one_epoch_runs.out['copy'], 'checkpoint.pth'), str(tmp_path / 'x'))
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


@pytest.mark.slow
def test_attention_diagnostics_match_independent_computation(one_epoch_runs, tmp_path):
    checkpoint = os.path.join(one_epoch_runs.out['distill'], 'checkpoint.pth')
    out = str(tmp_path / 'diag')
    visualize_attention.main(['--checkpoint', checkpoint, '--data_path', one_epoch_runs.data, '--output_dir', out,
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
    transform = build_transform(False, SimpleNamespace(**{**DATA_DEFAULTS, 'eval_crop_pct': 1.0}, input_size=32))
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(one_epoch_runs.data, 'val')) for f in fs)
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


# ---- data preparation ----------------------------------------------------------------------------
def write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def fake_cifar10(root, per_batch=10):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
    write_pickle(os.path.join(root, 'batches.meta'), {b'label_names': names})
    batches = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(10).tolist()[:per_batch]
        write_pickle(os.path.join(root, name), {b'data': data, b'labels': labels})
        batches[name] = (data, labels)
    return batches


def test_prepare_cifar10_writes_imagefolder_with_cifar_labels(tmp_path):
    src, dst = str(tmp_path / 'cifar-10-batches-py'), str(tmp_path / 'cifar10')
    batches = fake_cifar10(src)
    counts = prepare_cifar.convert(src, dst)
    assert counts == {'train': 50, 'val': 10}
    data, labels = batches['data_batch_2']
    image = np.asarray(Image.open(os.path.join(dst, 'train', prepare_cifar.class_folders(
        ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'])[labels[1]],
        '00011.png')))
    assert np.array_equal(image, data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    args = SimpleNamespace(**DATA_DEFAULTS, input_size=32, nb_classes=10, data_path=dst)
    val = build_dataset(False, args)
    test_data, test_labels = batches['test_batch']
    assert len(val) == 10 and sorted(t for _, t in val.samples) == sorted(test_labels)
    names = 'airplane automobile bird cat deer dog frog horse ship truck'.split()
    assert val.classes == names


def test_prepare_cifar100_uses_fine_labels_and_keeps_label_order(tmp_path):
    src, dst = str(tmp_path / 'cifar-100-python'), str(tmp_path / 'cifar100')
    os.makedirs(src)
    names = [b'zebra', b'apple', b'maple_tree']  # not sorted: folders get label prefixes
    write_pickle(os.path.join(src, 'meta'), {b'fine_label_names': names})
    rng = np.random.default_rng(1)
    for split in ('train', 'test'):
        write_pickle(os.path.join(src, split), {b'data': rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                                                 b'fine_labels': [0, 1, 2, 0, 1, 2], b'coarse_labels': [0] * 6})
    prepare_cifar.convert(src, dst)
    assert sorted(os.listdir(os.path.join(dst, 'train'))) == ['0_zebra', '1_apple', '2_maple_tree']
    val = build_dataset(False, SimpleNamespace(**DATA_DEFAULTS, input_size=32, nb_classes=3, data_path=dst))
    assert [t for _, t in val.samples] == [0, 0, 1, 1, 2, 2]


def test_prepare_tinyimagenet_moves_val_into_class_folders(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    rng = np.random.default_rng(2)
    wnids = ['n01443537', 'n01629819']
    for w in wnids:
        os.makedirs(root / 'train' / w / 'images')
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                root / 'train' / w / 'images' / f'{w}_{i}.JPEG')
    os.makedirs(root / 'val' / 'images')
    lines = []
    for i in range(4):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        image.save(root / 'val' / 'images' / f'val_{i}.JPEG')
        lines.append(f'val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63')
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')

    assert prepare_tinyimagenet.reorganise_val(str(root)) == 4
    assert sorted(os.listdir(root / 'val' / wnids[1])) == ['val_1.JPEG', 'val_3.JPEG']
    assert not (root / 'val' / 'images').exists()
    assert prepare_tinyimagenet.reorganise_val(str(root)) == 0  # idempotent
    args = SimpleNamespace(**DATA_DEFAULTS, input_size=32, nb_classes=2, data_path=str(root), color_jitter=None,
                           aa=None,
                           reprob=0.0, remode='pixel', recount=1)
    train, val = build_dataset(True, args), build_dataset(False, args)
    assert train.classes == val.classes == wnids and len(train) == 4 and len(val) == 4


# ---- moved from test_bad_input.py: the tools refuse bad input; the diagnostics of a copy-mode student --------------
@pytest.mark.parametrize('extra, expected', [
    (['--images', '{root}/missing.png'], "--images '{root}/missing.png': no such file"),
    (['--images', '{root}/not_an_image.png'], "not a readable image"),
    (['--images'], '--images names no file'),
    (['--map_layers', 'x'], "--map_layers 'x': give layer numbers"),
    (['--heads', '0'], '--heads 0: must be >= 1'),
    (['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    (['--output_dir', '{root}/a_file'], "--output_dir '{root}/a_file' is a file, not a folder"),
])
def test_visualize_attention_refuses_bad_flags_before_loading_models(tmp_path, monkeypatch, extra, expected):
    (tmp_path / 'a_file').write_text('keep me')
    (tmp_path / 'not_an_image.png').write_bytes(b'not a png')
    monkeypatch.setattr(visualize_attention, 'load_models', lambda *a: pytest.fail('the models were loaded'))
    argv = ['--checkpoint', 'ckpt.pth', '--data_path', str(tmp_path), '--output_dir', str(tmp_path / 'out')]
    with pytest.raises(UserError) as err:
        visualize_attention.main(argv + [x.format(root=tmp_path) for x in extra])
    assert expected.format(root=tmp_path) in str(err.value)
    assert (tmp_path / 'a_file').read_text() == 'keep me'


@pytest.mark.slow
def test_visualize_attention_refuses_a_layer_the_models_lack_before_reading_data(small_work, pair_runs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(visualize_attention, 'image_folder', lambda *a, **k: pytest.fail('data were read'))
    with pytest.raises(UserError, match=r"--map_layers 0,99: no layer 99; the compared models have layers 0 to 3"):
        visualize_attention.main(['--checkpoint', pair_runs['distill'].checkpoint, '--data_path', small_work.data,
                                  '--output_dir', str(tmp_path / 'out'), '--map_layers', '0,99'])


def norm1_inputs(vits: dict, run) -> dict:
    """Run ``run()`` and return what each named ViT's blocks feed their attention (norm1 outputs)."""
    inputs = {}
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o, key=(name, k): inputs.__setitem__(key, o))
             for name, vit in vits.items() for k, blk in enumerate(vit.blocks)]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return inputs


def float64_map(attn, h) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float64 from the raw qkv weights (the tiny ViTs have no qk-norm)."""
    B, N, _ = h.shape
    qkv = (h.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()).view(B, N, 3, attn.num_heads, -1)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)


@pytest.mark.slow
def test_visualize_attention_of_a_copy_student_compares_the_maps_it_uses(small_work, pair_runs, tmp_path, capsys):
    """In the copied layers (0-2) a copy-mode student attends with the teacher's maps: the metrics say so
    (JSD 0, CE = the teacher's entropy) and name the source; in layer 3 it attends with its own map, computed
    on the tokens of the dual forward (not on those of the student run alone)."""
    ckpt = torch.load(pair_runs['copy'].checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in ckpt['model'].items():  # a student whose own attention is far from uniform
        if key.endswith('attn.qkv.weight'):
            qk = value[:2 * TINY_ARCH['embed_dim']]
            qk.copy_(torch.randn(qk.shape, generator=generator) * 0.5)
    checkpoint = str(tmp_path / 'copy_checkpoint.pth')
    torch.save(ckpt, checkpoint)
    rows = visualize_attention.main(['--checkpoint', checkpoint, '--data_path', small_work.data, '--output_dir',
                                     str(tmp_path / 'diag'), '--num_show', '1', '--batch_size', '5',
                                     '--num_workers', '0'])
    printed = capsys.readouterr().out
    assert 'in layers 0, 1, 2 the student attends with what the teacher hands over' in printed
    assert 'JSD is 0 by construction' in printed
    with open(tmp_path / 'diag' / 'attention_metrics.csv') as f:
        written = list(csv.DictReader(f))
    assert [r['student_map'] for r in written] == ["teacher's (copied)"] * 3 + ['own']

    # independent: the dual model's own evaluation forward, maps recomputed in float64 from its norm1 inputs
    _, _, spec, model = visualize_attention.load_models(checkpoint, None)
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(small_work.data, 'val')) for f in fs)
    transform = eval_transform(spec.img_size, spec.eval_crop_pct, spec.mean, spec.std)
    x = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
    inputs = norm1_inputs({'teacher': model.teacher, 'student': model.student}, lambda: model(x))
    for layer in range(3):
        t = float64_map(model.teacher.blocks[layer].attn, inputs['teacher', layer])
        entropy = -(t * t.log()).sum(-1).mean().item()
        assert rows[layer]['jsd'] == pytest.approx(0.0, abs=1e-6)
        assert rows[layer]['teacher_entropy'] == pytest.approx(entropy, rel=1e-4)
        assert rows[layer]['student_entropy'] == pytest.approx(entropy, rel=1e-4)
        assert rows[layer]['teacher_student_ce'] == pytest.approx(entropy, rel=1e-4)
    s = float64_map(model.student.blocks[3].attn, inputs['student', 3])
    entropy = -(s * s.log()).sum(-1).mean().item()
    assert rows[3]['student_entropy'] == pytest.approx(entropy, rel=1e-4)
    alone = norm1_inputs({'student': model.student}, lambda: model.student(x))
    s_alone = float64_map(model.student.blocks[3].attn, alone['student', 3])
    entropy_alone = -(s_alone * s_alone.log()).sum(-1).mean().item()
    assert abs(entropy_alone - entropy) > 1e-2 * entropy  # the student run alone has other maps there


def test_export_student_garbage_and_unwritable_output(small_work):
    garbage = small_work.root / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(UserError, match=re.escape(str(garbage))):
        export_student.main(['--checkpoint', str(garbage), '--output', str(small_work.root / 'export')])
    ckpt = str(small_work.root / 'student.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict(), 'args': dict(model='vit_base_patch16_224', model_kwargs=TINY_ARCH,
                                                        nb_classes=3, input_size=32, global_pool=True)}, ckpt)
    blocker = small_work.root / 'blocker'
    blocker.write_text('a file where a folder should be')
    with pytest.raises(UserError, match='--output') as err:
        export_student.main(['--checkpoint', ckpt, '--output', str(blocker / 'student')])
    assert str(blocker) in str(err.value)


def test_prepare_cifar_with_wrong_src(tmp_path):
    with pytest.raises(UserError, match='--src'):
        prepare_cifar.main(['--src', str(tmp_path), '--dst', str(tmp_path / 'out')])
