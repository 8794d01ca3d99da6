"""Attention Probe distillation: its losses, the whole pipeline (teacher trained here -> selection from a
generated wild set -> probe distillation), and DFND_DeiT-train.py, the reference's command mapped onto the
two scripts."""
import importlib.util
import json
import math
import os
import warnings

import pytest
import torch
from helpers import ROOT, TINY_ARCH, make_teacher_checkpoint, make_wild_folder, run_selection, tiny_args

import main_finetune
from models_pairing import default_probe_blocks
from models_pairing import relative_depth_blocks as match_layers
from util.losses import kd_loss, noise_transition_matrix, patch_attention_probe_loss
from util.pretrained import read_checkpoint


# ---- probe distillation losses ----------------------------------------------------------------------
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


# ---- the whole pipeline ---------------------------------------------------------------------------------
def test_teacher_selection_probe_distillation_end_to_end(workdir, tmp_path):
    target = workdir.data
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


# ---- DFND_DeiT-train.py: the reference's command mapped onto the two scripts -----------------------------
def load_dfnd():
    spec = importlib.util.spec_from_file_location('dfnd_deit_train', os.path.join(ROOT, 'DFND_DeiT-train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dfnd_command_runs_end_to_end(shared_images, tmp_path):
    """The reference's command on a tiny teacher (4x4 patches, the student's token grid) and generated data."""
    teacher_path = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), classes=3, patch_size=4)
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': {**TINY_ARCH, 'patch_size': 4}, 'nb_classes': 3,
                    'input_size': 32, 'global_pool': True, 'mode': None}
    torch.save(ckpt, teacher_path)
    target = shared_images(classes=3, train_per_class=2, val_per_class=2)
    wild = shared_images(classes=3, train_per_class=6, val_per_class=0, seed=3)
    out = str(tmp_path / 'output') + os.sep
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        stats = load_dfnd().main(
            ['--dataset', 'cifar10', '--data_cifar', target, '--data_imagenet', wild, '--num_select', '8',
             '--teacher_dir', teacher_path, '--selected_file', str(tmp_path / 'selected') + os.sep,
             '--output_dir', out, '--nb_classes', '3', '--lr_S', '7.5e-4', '--attnprobe_sel', '--attnprobe_dist',
             '--robust', '--epochs', '1', '--batch_size', '4', '--device', 'cpu', '--num_workers', '0'])
    assert 0.0 <= stats['test_acc1'] <= 100.0
    run = read_checkpoint(os.path.join(out, 'student', 'checkpoint.pth'))
    assert run['args']['teacher_acc'] == 0.9665 and run['args']['sched'] == 'step' and not run['args']['global_pool']
    assert read_checkpoint(str(tmp_path / 'selected' / 'selection.pth'))['ranking'] == 'output'
    assert os.path.exists(str(tmp_path / 'selected' / 'selection.pth.aug_weights.pth'))
