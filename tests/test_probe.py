"""Attention Probe: selection scores, resumable selection, probe-distillation losses, and the whole
pipeline (teacher trained here -> selection from a generated wild set -> probe distillation)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, colour_image, free_port, make_image_folder, make_teacher_checkpoint, tiny_args
from PIL import Image

import main_finetune
import select_wild_data
from models_dual_vit import create_vit
from models_probe import default_probe_blocks, match_layers
from util.errors import UserError
from util.losses import kd_loss, noise_transition_matrix, patch_attention_probe_loss
from util.pretrained import read_checkpoint
from util.selection import list_images, wild_transform

ARCH = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


def make_wild_folder(root, n_task=12, n_noise=12, size=32, seed=1):
    """Task-like images (the colour task) mixed with pure-noise distractors, in nested folders."""
    rng = np.random.default_rng(seed)
    for i in range(n_task):
        folder = os.path.join(root, 'a' if i % 2 else 'b', 'deep')
        os.makedirs(folder, exist_ok=True)
        colour_image(rng, i % 3, size).save(os.path.join(folder, f'task_{i:02d}.png'))
    os.makedirs(os.path.join(root, 'noise'), exist_ok=True)
    for i in range(n_noise):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(root, 'noise', f'noise_{i:02d}.jpg'))
    return str(root)


def independent_scores(teacher, images, blocks, prefix=1):
    """Output score and head-0 probe cosine computed from the raw weights, via hooks on norm1."""
    inputs = {}
    hooks = [teacher.blocks[b].norm1.register_forward_hook(lambda m, i, o, b=b: inputs.__setitem__(b, o))
             for b in blocks]
    with torch.no_grad():
        logits = teacher(images)
    for h in hooks:
        h.remove()
    out = F.cross_entropy(logits, logits.argmax(1), reduction='none')
    probes = []
    for b in blocks:
        attn = teacher.blocks[b].attn
        h = inputs[b]
        B, N, C = h.shape
        qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).view(B, N, 3, attn.num_heads, attn.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        a = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
        row = a[:, 0, 0, prefix:]
        probes.append(F.cosine_similarity(row, torch.full_like(row, 1.0 / row.shape[1]), dim=1))
    return out, torch.stack(probes, 1), logits


def run_selection(teacher_path, wild, output, *extra):
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', output, '--num_select', '10',
         '--chunk_size', '7', '--batch_size', '5', '--num_workers', '0', '--device', 'cpu', *extra])
    return select_wild_data.main(args)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('probe')
    teacher_path = make_teacher_checkpoint(str(root / 'teacher.pth'), classes=3)
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': ARCH, 'nb_classes': 3, 'input_size': 32,
                    'global_pool': True, 'mode': None}
    torch.save(ckpt, teacher_path)
    wild = make_wild_folder(str(root / 'wild'))
    return root, teacher_path, wild


# ---- 1. selection scores -------------------------------------------------------------------------
def test_scores_match_independent_computation(setup):
    root, teacher_path, wild = setup
    selection = run_selection(teacher_path, wild, str(root / 'sel.pth'))
    teacher = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **ARCH)
    teacher.load_state_dict(torch.load(teacher_path)['model'])
    teacher.eval()
    paths = list_images(wild)
    assert selection['paths'] == paths and len(paths) == 24
    transform = wild_transform(32, train=False)
    images = torch.stack([transform(Image.open(os.path.join(wild, p)).convert('RGB')) for p in paths])
    blocks = default_probe_blocks(4)[:2]
    out, probe, logits = independent_scores(teacher, images, blocks)
    torch.testing.assert_close(selection['scores']['output'], out, rtol=1e-4, atol=1e-5)
    for i, b in enumerate(blocks):
        torch.testing.assert_close(selection['scores']['probe'][b], probe[:, i], rtol=1e-4, atol=1e-5)
    combined = 0.05 * probe.sum(1) + 0.9 * out
    expected = set(combined.argsort()[:10].tolist())
    assert set(selection['selected'].tolist()) == expected
    soft = logits.softmax(1)[list(expected)].sum(0)
    weights = (1 / soft) / (1 / soft).sum() * 3
    torch.testing.assert_close(selection['soft_sums'], soft, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(selection['class_weights'], weights, rtol=2e-3, atol=1e-3)
    assert torch.equal(selection['predictions'], logits.argmax(1))


def test_output_probe_and_random_rankings(setup):
    root, teacher_path, wild = setup
    full = run_selection(teacher_path, wild, str(root / 'sel_combined.pth'))
    by_output = run_selection(teacher_path, wild, str(root / 'sel_out.pth'), '--score', 'output')
    assert set(by_output['selected'].tolist()) == set(full['scores']['output'].argsort()[:10].tolist())
    probe = sum(full['scores']['probe'].values())
    by_probe = run_selection(teacher_path, wild, str(root / 'sel_probe.pth'), '--score', 'probe')
    assert set(by_probe['selected'].tolist()) == set(probe.argsort()[:10].tolist())
    rand = run_selection(teacher_path, wild, str(root / 'sel_rand.pth'), '--random', '--seed', '3')
    assert len(set(rand['selected'].tolist())) == 10 and rand['ranking'] == 'random'


def test_mean_over_heads_probe(setup):
    root, teacher_path, wild = setup
    sel = run_selection(teacher_path, wild, str(root / 'sel_mean.pth'), '--probe_heads', 'mean',
                        '--probe_blocks', '1')
    teacher = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **ARCH)
    teacher.load_state_dict(torch.load(teacher_path)['model'])
    inputs = {}
    teacher.blocks[1].norm1.register_forward_hook(lambda m, i, o: inputs.__setitem__('h', o))
    transform = wild_transform(32, train=False)
    x = torch.stack([transform(Image.open(os.path.join(wild, p)).convert('RGB')) for p in sel['paths']])
    with torch.no_grad():
        teacher.eval()(x)
    attn, h = teacher.blocks[1].attn, inputs['h']
    qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).view(len(x), 17, 3, 3, 16)
    a = (qkv[:, :, 0].transpose(1, 2) @ qkv[:, :, 1].permute(0, 2, 3, 1) / 4.0).softmax(-1)
    rows = a[:, :, 0, 1:]
    cos = F.cosine_similarity(rows, torch.full_like(rows, 1 / 16), dim=-1).mean(1)
    torch.testing.assert_close(sel['scores']['probe'][1], cos, rtol=1e-4, atol=1e-5)


# ---- 2. selection survives interruption ----------------------------------------------------------
def test_interrupted_selection_resumes_to_the_same_file(setup, monkeypatch):
    root, teacher_path, wild = setup
    reference = run_selection(teacher_path, wild, str(root / 'ref.pth'))
    score_chunk, calls = select_wild_data.score_chunk, [0]

    def crash_on_third_chunk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return score_chunk(*args, **kwargs)

    monkeypatch.setattr(select_wild_data, 'score_chunk', crash_on_third_chunk)
    out = str(root / 'resumed.pth')
    with pytest.raises(KeyboardInterrupt):
        run_selection(teacher_path, wild, out)
    assert sorted(os.listdir(out + '.chunks')) == ['chunk_000000.pth', 'chunk_000001.pth', 'manifest.json']
    monkeypatch.setattr(select_wild_data, 'score_chunk', score_chunk)
    calls[0] = 0
    counting = []
    monkeypatch.setattr(select_wild_data, 'score_chunk', lambda *a, **k: counting.append(1) or score_chunk(*a, **k))
    resumed = run_selection(teacher_path, wild, out)
    assert len(counting) == 2  # only the two chunks left (24 images in chunks of 7)
    saved = read_checkpoint(out)
    for key in ('selected', 'predictions', 'soft_sums', 'class_weights', 'value'):
        assert torch.equal(saved[key], reference[key]), key
    assert torch.equal(resumed['scores']['output'], reference['scores']['output'])
    # a rerun with other settings must not mix its scores with these
    with pytest.raises(UserError, match='scores of another run.*probe_heads'):
        run_selection(teacher_path, wild, out, '--probe_heads', 'mean')


# ---- 3. probe distillation losses ----------------------------------------------------------------
def test_kd_loss_with_temperature_and_robust_weights():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    T = 4.0
    q, log_p = (t / T).softmax(1), (s / T).log_softmax(1)
    per_sample = (q * (q.log() - log_p)).sum(1)
    torch.testing.assert_close(kd_loss(s, t, T), per_sample.mean().float() * T ** 2, rtol=1e-5, atol=1e-6)
    w = torch.rand(6)
    torch.testing.assert_close(kd_loss(s, t, T, w), (per_sample.float() * w).mean() * T ** 2, rtol=1e-5, atol=1e-6)


def test_noise_transition_matrix_rows():
    params = torch.randn(4, 3)
    m = noise_transition_matrix(params, 0.9)
    torch.testing.assert_close(m.sum(1), torch.ones(4))
    torch.testing.assert_close(m.diagonal(), torch.full((4,), 0.9))
    off = params.softmax(1) * 0.1
    for i in range(4):
        expected = torch.cat([off[i, :i], torch.tensor([0.9]), off[i, i:]])
        torch.testing.assert_close(m[i], expected)


@pytest.mark.parametrize('norm', ['tokens', 'channels'])
def test_patch_attention_probe_loss_against_loops(norm):
    t_feats = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    s_feats = [torch.randn(2, 5, 3), torch.randn(2, 5, 3)]  # a narrower student
    total = 0.0
    for t, s in zip(t_feats, s_feats):
        for b in range(2):
            def probe(f):
                f = f / f.norm(dim=0 if norm == 'tokens' else 1, keepdim=True)
                return torch.stack([(f[0] * f[j]).sum() for j in range(1, 5)])
            total += ((probe(t[b]) - probe(s[b])) ** 2).sum()
    expected = total / (2 * 2 * 4)
    torch.testing.assert_close(patch_attention_probe_loss(t_feats, s_feats, 1, norm), expected)


def test_layers_matched_by_relative_depth():
    assert default_probe_blocks(12) == [3, 7, 11]
    assert match_layers([3, 7, 11], 12, 12) == [3, 7, 11]
    assert match_layers([3, 7, 11], 12, 6) == [1, 3, 5]


# ---- 4. the whole pipeline -----------------------------------------------------------------------
def test_teacher_selection_probe_distillation_end_to_end(tmp_path):
    target = make_image_folder(str(tmp_path / 'target'))
    teacher_out = str(tmp_path / 'teacher')
    main_finetune.run(tiny_args(target, teacher_out, '--lr', '3e-3', epochs=2))
    wild = make_wild_folder(str(tmp_path / 'wild'), n_task=24, n_noise=24)
    teacher_ckpt = os.path.join(teacher_out, 'checkpoint.pth')
    run_selection(teacher_ckpt, wild, str(tmp_path / 'selection.pth'), '--num_select', '24')

    out = str(tmp_path / 'student')
    student = ['--student_model', 'vit_tiny_patch16_224', '--student_kwargs', 'patch_size=8', 'embed_dim=32',
               'depth=2', 'num_heads=2']
    argv = ['--mode', 'probe', '--finetune', teacher_ckpt, '--selection', str(tmp_path / 'selection.pth'),
            '--eval_data_path', target, '--nb_classes', '3', '--input_size', '32', '--epochs', '2',
            '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--print_freq', '1', '--robust',
            '--output_dir', out, '--log_dir', out, *student]
    stats = main_finetune.run(argv)
    log = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
    assert [e['epoch'] for e in log] == [0, 1]
    for entry in log:
        assert all(math.isfinite(entry[k]) for k in ('train_loss', 'train_loss_kd', 'train_loss_noise',
                                                     'train_loss_probe', 'test_acc1'))
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert ckpt['args']['lr'] == 7.5e-4 and ckpt['args']['weight_decay'] == 0.025  # the reference recipe
    assert ckpt['args']['student_kwargs']['embed_dim'] == 32 and 'teacher' not in ckpt
    assert ckpt['criterion']['noise_params'].shape == (3, 2)
    assert 0.0 <= ckpt['args']['teacher_acc'] <= 1.0
    # the student evaluates alone from its checkpoint, reproducing the logged accuracy
    again = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--data_path', target,
                               '--device', 'cpu', '--num_workers', '0'])
    assert again['test_acc1'] == pytest.approx(stats['test_acc1'])
    assert again['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-5)
    # and training resumes from it
    main_finetune.run(argv[:argv.index('--epochs') + 1] + ['3'] + argv[argv.index('--epochs') + 2:]
                      + ['--resume', 'allow'])
    assert [json.loads(line)['epoch'] for line in open(os.path.join(out, 'log.txt'))] == [0, 1, 2]


def test_torchrun_selection_shards_and_probe_ranks_agree(setup, tmp_path):
    root, teacher_path, wild = setup
    single = run_selection(teacher_path, wild, str(tmp_path / 'single.pth'))
    port = str(free_port())
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', port,
           os.path.join(ROOT, 'select_wild_data.py'), '--teacher', teacher_path, '--wild_path', wild, '--output',
           str(tmp_path / 'sharded.pth'), '--num_select', '10', '--chunk_size', '7', '--batch_size', '5',
           '--num_workers', '0', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = read_checkpoint(str(tmp_path / 'sharded.pth'))
    assert torch.equal(sharded['selected'], single['selected'])
    torch.testing.assert_close(sharded['scores']['output'], single['scores']['output'])

    target = make_image_folder(str(tmp_path / 'target'))
    out = str(tmp_path / 'student')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           os.path.join(ROOT, 'tests', 'ddp_worker.py'), '--mode', 'probe', '--finetune', teacher_path,
           '--selection', str(tmp_path / 'sharded.pth'), '--eval_data_path', target, '--nb_classes', '3',
           '--input_size', '32', '--epochs', '1', '--batch_size', '2', '--num_workers', '0', '--device', 'cpu',
           '--dist_eval', '--output_dir', out, '--log_dir', out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(os.path.join(out, f'rank{r}_epoch0.pt')) for r in (0, 1))
    assert all(torch.equal(v, r1[k]) for k, v in r0.items())
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['criterion']['noise_params'].abs().sum() > 0
