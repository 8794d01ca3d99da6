"""Bad input answered before any long work by one clear `error:` line (a UserError through run_cli, no
traceback) naming the flag or file, the problem and the fix, or a warning where the run is right to go on:
from main_finetune.py, select_wild_data.py, tools/visualize_attention.py, tools/export_student.py and
tools/prepare_cifar.py; bugs keep their traceback. Also the attention diagnostics of a copy-mode student,
which are of the maps it uses."""
import argparse
import contextlib
import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from helpers import (
    ROOT,
    TINY_ARCH,
    add_to_hub_cache,
    kwargs_flags,
    make_teacher_checkpoint,
    make_unwritable,
    make_writable,
    tiny_args,
)
from PIL import Image
from timm.models import save_for_hf

import engine_finetune
import main_finetune
import modes
import select_wild_data
import util.eval_classes
from engine_finetune import NonFiniteLossError
from models_vit import create_vit
from modes import get_mode
from tools import export_student, prepare_cifar, visualize_attention
from util.datasets import DataError, eval_transform
from util.errors import DEBUG_ENV, UserError, run_cli
from util.pretrained import CheckpointMismatchError, read_checkpoint, resolve_named

ENTRY_POINTS = ['main_finetune.py', 'select_wild_data.py', 'submitit_finetune.py', 'demo.py',
                'tools/export_student.py', 'tools/prepare_cifar.py', 'tools/prepare_tinyimagenet.py',
                'tools/visualize_attention.py']


@pytest.fixture(scope='module')
def work(workdir, shared_images):
    """The shared teacher, 8 training and 3 validation images a class, and this module's output folder."""
    return SimpleNamespace(root=workdir.root, data=shared_images(train_per_class=8, val_per_class=3),
                           teacher=workdir.teacher)


@pytest.fixture(scope='module')
def runs(work):
    """One-epoch runs in distill mode and in copy mode (layers 0-2 of 4 copied), each with its own copy of the
    teacher."""
    runs = {}
    for mode, extra in (('distill', ()), ('copy', ('--end_layer', '-1'))):
        runs[mode] = SimpleNamespace(out=str(work.root / mode), teacher=str(work.root / f'{mode}_teacher.pth'))
        shutil.copy(work.teacher, runs[mode].teacher)
        main_finetune.run(tiny_args(work.data, runs[mode].out, '--mode', mode, '--finetune', runs[mode].teacher,
                                    *extra, epochs=1))
        runs[mode].checkpoint = os.path.join(runs[mode].out, 'checkpoint.pth')
    return runs


def run_args(work, name, *extra, epochs=1):
    return tiny_args(work.data, str(work.root / name), *extra, epochs=epochs)


def user_error(argv) -> str:
    with pytest.raises(UserError) as err:
        main_finetune.run(argv)
    return str(err.value)


def no_long_work(monkeypatch, *names):
    """Make the named functions of main_finetune (or of the engine) fail the test when called: the check must
    come first."""
    for name in names:
        modules = [m for m in (main_finetune, engine_finetune, util.eval_classes, modes) if hasattr(m, name)]
        assert modules, name
        for module in modules:
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))


# ---- reporting: one error line, bugs keep their traceback ---------------------------------------------------
def test_run_cli_prints_one_error_paragraph_and_exits_1(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def bad():
        raise UserError("--flag 3: must be below 2; pass --flag 1")
    with pytest.raises(SystemExit) as stop:
        run_cli(bad)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: --flag 3: must be below 2; pass --flag 1\n"

    monkeypatch.setenv(DEBUG_ENV, '1')
    with pytest.raises(SystemExit):
        run_cli(bad)
    err = capsys.readouterr().err
    assert 'Traceback' in err and err.endswith("error: --flag 3: must be below 2; pass --flag 1\n")


def test_run_cli_lets_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)

    def bug():
        raise KeyError('not a user error')
    with pytest.raises(KeyError):
        run_cli(bug)
    assert run_cli(lambda x: x + 1, 1) == 2


def test_every_entry_point_reports_through_run_cli():
    for script in ENTRY_POINTS:
        with open(os.path.join(ROOT, script)) as f:
            tail = f.read().split("if __name__ == '__main__':")[-1]
        assert 'run_cli(' in tail, f"{script} does not run its main through util.errors.run_cli"


def test_existing_error_types_are_user_errors():
    for kind in (DataError, CheckpointMismatchError, export_student.ExportError):
        assert issubclass(kind, UserError)


@pytest.mark.slow
def test_main_finetune_bad_flag_prints_error_without_traceback(work):
    env = {k: v for k, v in os.environ.items() if k not in (DEBUG_ENV, 'WORLD_SIZE', 'RANK')}
    cmd = [sys.executable, os.path.join(ROOT, 'main_finetune.py'), *run_args(work, 'cli', '--drop_path', '1.5')]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    assert out.stderr.startswith('error: --drop_path 1.5'), out.stderr
    assert not os.path.exists(work.root / 'cli')  # nothing written


# ---- select_wild_data.py ------------------------------------------------------------------------------------
@pytest.mark.parametrize('extra, expected', [
    (['--chunk_size', '0'], '--chunk_size 0: must be >= 1'),
    (['--chunk_size', '-5'], '--chunk_size -5: must be >= 1'),
    (['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    (['--attnlier', 'nan'], '--attnlier nan: must be a finite weight'),
    (['--outlier', 'nan'], '--outlier nan: must be a finite weight'),
    (['--output', '{root}/selections/'], "names a folder, but the selection is one file"),
    (['--output', '{root}/blocker/selection.pth'], "is a file, not a folder"),
    (['--output', '{root}/readonly/selection.pth'], "cannot be written"),
])
def test_select_wild_data_refuses_bad_flags_before_scoring(tmp_path, monkeypatch, extra, expected):
    (tmp_path / 'blocker').write_text('a file where a folder should be')
    extra = [x.format(root=tmp_path) for x in extra]
    if 'readonly' in extra[-1] and not make_unwritable(tmp_path / 'readonly'):
        pytest.skip('cannot make a folder unwritable here')
    monkeypatch.setattr(select_wild_data, 'read_checkpoint', lambda *a, **k: pytest.fail('the teacher was loaded'))
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', 'teacher.pth', '--wild_path', str(tmp_path), '--output', str(tmp_path / 'sel.pth'),
         '--device', 'cpu', *extra])
    try:
        with pytest.raises(UserError) as err:
            select_wild_data.main(args)
    finally:
        if 'readonly' in extra[-1]:
            make_writable(tmp_path / 'readonly')
    message = str(err.value)
    assert expected in message, message
    if '--output' in extra:
        assert extra[-1] in message or os.path.dirname(extra[-1]) in message
    if extra[-1].endswith('/'):
        assert f"--output {os.path.join(extra[-1], 'selection.pth')}" in message  # the fix, spelled out


@pytest.fixture(scope='module')
def wild(work):
    folder = work.root / 'wild'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return str(folder)


@pytest.mark.parametrize('num_select', ['0', '6'])
def test_num_select_checked_before_scoring(work, wild, num_select, monkeypatch):
    monkeypatch.setattr(select_wild_data, 'score_chunk', lambda *a, **k: pytest.fail('scoring started'))
    args = select_wild_data.get_args_parser().parse_args([
        '--teacher', work.teacher, '--model', 'vit_base_patch16_224', '--model_kwargs',
        *kwargs_flags(TINY_ARCH), '--nb_classes', '3', '--input_size', '32',
        '--wild_path', wild, '--output', str(work.root / f'sel{num_select}.pth'), '--num_select', num_select,
        '--num_workers', '0', '--device', 'cpu'])
    with pytest.raises(UserError, match=f'--num_select {num_select}'):
        select_wild_data.main(args)


# ---- tools/visualize_attention.py ---------------------------------------------------------------------------
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
def test_visualize_attention_refuses_a_layer_the_models_lack_before_reading_data(work, runs, tmp_path, monkeypatch):
    monkeypatch.setattr(visualize_attention, 'image_folder', lambda *a, **k: pytest.fail('data were read'))
    with pytest.raises(UserError, match=r"--map_layers 0,99: no layer 99; the compared models have layers 0 to 3"):
        visualize_attention.main(['--checkpoint', runs['distill'].checkpoint, '--data_path', work.data,
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
def test_visualize_attention_of_a_copy_student_compares_the_maps_it_uses(work, runs, tmp_path, capsys):
    """In the copied layers (0-2) a copy-mode student attends with the teacher's maps: the metrics say so
    (JSD 0, CE = the teacher's entropy) and name the source; in layer 3 it attends with its own map, computed
    on the tokens of the dual forward (not on those of the student run alone)."""
    ckpt = torch.load(runs['copy'].checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in ckpt['model'].items():  # a student whose own attention is far from uniform
        if key.endswith('attn.qkv.weight'):
            qk = value[:2 * TINY_ARCH['embed_dim']]
            qk.copy_(torch.randn(qk.shape, generator=generator) * 0.5)
    checkpoint = str(tmp_path / 'copy_checkpoint.pth')
    torch.save(ckpt, checkpoint)
    rows = visualize_attention.main(['--checkpoint', checkpoint, '--data_path', work.data, '--output_dir',
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
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(work.data, 'val')) for f in fs)
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


# ---- values of main_finetune.py checked before any work -----------------------------------------------------
@pytest.mark.parametrize('extra, expected', [
    (['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    (['--std', '0', '0', '0'], '--std 0 0 0: every std must be > 0'),
    (['--std', '-1', '-1', '-1'], '--std -1 -1 -1: every std must be > 0'),
    (['--mean', '124', '116', '104'], 'divide by 255: --mean 0.486 0.455 0.408'),
    (['--std', '58.4', '57.1', '57.4'], 'divide by 255: --std 0.229 0.224 0.225'),
    (['--mean', 'nan', '0.4', '0.4'], '--mean nan 0.4 0.4: must be finite'),
    (['--mode', 'probe', '--presentations', '0'], '--presentations 0: must be >= 1'),
    (['--mode', 'probe', '--presentations', '-3'], '--presentations -3: must be >= 1'),
    (['--mode', 'probe', '--pos_num', '-1'], '--pos_num -1: must be >= 0'),
    (['--mode', 'probe', '--kd_temperature', '0'], '--kd_temperature 0: must be > 0'),
    (['--mode', 'probe', '--kd_temperature', '-4'], '--kd_temperature -4: must be > 0'),
    (['--mode', 'probe', '--teacher_acc', '96.65'], '--teacher_acc 96.65: must lie in [0, 1]'),
    (['--mode', 'probe', '--teacher_acc', '-0.1'], '--teacher_acc -0.1: must lie in [0, 1]'),
    (['--lr', '-1'], '--lr -1: must be > 0'),
    (['--lr', '0'], '--lr 0: must be > 0'),
    (['--blr=-1e-3'], '--blr -0.001: must be > 0'),
])
def test_numeric_flags_are_refused_before_any_work(work, tmp_path, monkeypatch, extra, expected):
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    argv = tiny_args(work.data, str(tmp_path / 'out'), '--finetune', work.teacher, *extra)
    with pytest.raises(UserError) as err:
        main_finetune.run(argv)
    assert str(err.value).startswith(expected) or expected in str(err.value), str(err.value)


@pytest.mark.parametrize('flag, value', [
    ('--epochs', '0'), ('--atd_weight', '-1'), ('--atd_weight', 'nan'), ('--atd_weight', 'inf'),
    ('--drop_path', '1'), ('--drop_path', '-0.1'), ('--smoothing', '1'), ('--min_crop_scale', '0'),
    ('--min_crop_scale', '1.5'), ('--hflip', '1.5'),
])
def test_out_of_range_values(work, flag, value, monkeypatch):
    monkeypatch.setattr(engine_finetune, 'train_one_epoch', lambda *a, **k: pytest.fail('training started'))
    message = user_error(run_args(work, 'values', '--mode', 'distill', '--finetune', work.teacher, flag, value))
    assert f'{flag} {value}' in message


def test_end_layer_above_zero(work):
    message = user_error(run_args(work, 'end', '--mode', 'distill', '--finetune', work.teacher, '--end_layer', '1'))
    assert message.startswith('--end_layer: 1: must be <= 0') and 'first -' not in message


def test_transfer_layers_reversed_range_does_not_blame_end_layer(work):
    message = user_error(run_args(work, 'tl', '--mode', 'distill', '--finetune', work.teacher,
                                  '--transfer_layers', '3-1'))
    assert '--transfer_layers' in message and '1-3' in message and 'end_layer' not in message


@pytest.mark.parametrize('kwargs, match', [
    (['bogus_arg=1'], 'bogus_arg'), (['depth=four'], 'depth'), (['num_heads=5'], 'num_heads'),
])
def test_bad_model_kwargs(work, kwargs, match):
    argv = run_args(work, 'kw') + ['--model_kwargs', *kwargs_flags(TINY_ARCH), *kwargs]
    message = user_error(argv)
    assert '--model_kwargs' in message and match in message


def test_model_that_is_not_a_vit(work):
    message = user_error(run_args(work, 'resnet') + ['--model', 'resnet18', '--model_kwargs'])
    assert 'resnet18' in message and '--model' in message and 'VisionTransformer' in message


# ---- files that are not what the flag needs -----------------------------------------------------------------
def test_truncated_safetensors_names_the_file(work):
    path = str(work.root / 'teacher.safetensors')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    safetensors.torch.save_file(vit.state_dict(), path)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    message = user_error(run_args(work, 'trunc', '--finetune', path))
    assert path in message and '--finetune' in message


def test_resume_of_weights_only_file_points_to_finetune(work):
    path = str(work.root / 'weights_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict()}, path)
    message = user_error(run_args(work, 'weights_only', '--resume', path))
    assert path in message and '--finetune' in message and 'optimizer' in message


def test_checkpoint_with_only_model_ema_points_to_use_teacher_ema(work):
    path = str(work.root / 'ema_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model_ema': vit.state_dict()}, path)
    message = user_error(run_args(work, 'ema_only', '--finetune', path))
    assert path in message and '--use_teacher_ema' in message


def test_selection_that_is_not_a_selection_file(work):
    path = str(work.root / 'not_a_selection.pth')
    torch.save({'something': torch.zeros(2)}, path)
    message = user_error(run_args(work, 'bad_sel', '--mode', 'probe', '--finetune', work.teacher,
                                  '--selection', path))
    assert '--selection' in message and path in message and 'select_wild_data.py' in message


def test_output_dir_that_is_a_file(work):
    path = work.root / 'a_file'
    path.write_text('keep me')
    message = user_error(tiny_args(work.data, str(path)))
    assert '--output_dir' in message and str(path) in message
    assert path.read_text() == 'keep me'


def test_missing_or_empty_data_and_wrong_class_count_are_clear_errors(workdir, tmp_path):
    with pytest.raises(DataError, match=r"'/no/such/place/val' is not a directory.*train/<class>"):
        main_finetune.run(tiny_args('/no/such/place', str(tmp_path / 'a')))
    os.makedirs(tmp_path / 'empty' / 'val' / 'class_0')
    os.makedirs(tmp_path / 'empty' / 'train' / 'class_0')
    with pytest.raises(DataError, match='holds no images'):
        main_finetune.run(tiny_args(str(tmp_path / 'empty'), str(tmp_path / 'b')))
    with pytest.raises(DataError, match='has 3 class folders but --nb_classes is 5; pass --nb_classes 3'):
        main_finetune.run(tiny_args(workdir.data, str(tmp_path / 'c')) + ['--nb_classes', '5'])
    with pytest.raises(UserError, match=r"mode distill needs the teacher's weights: --finetune PATH"):
        main_finetune.run(tiny_args(workdir.data, str(tmp_path / 'd'), '--mode', 'distill'))


def test_export_student_garbage_and_unwritable_output(work):
    garbage = work.root / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(UserError, match=re.escape(str(garbage))):
        export_student.main(['--checkpoint', str(garbage), '--output', str(work.root / 'export')])
    ckpt = str(work.root / 'student.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict(), 'args': dict(model='vit_base_patch16_224', model_kwargs=TINY_ARCH,
                                                        nb_classes=3, input_size=32, global_pool=True)}, ckpt)
    blocker = work.root / 'blocker'
    blocker.write_text('a file where a folder should be')
    with pytest.raises(UserError, match='--output') as err:
        export_student.main(['--checkpoint', ckpt, '--output', str(blocker / 'student')])
    assert str(blocker) in str(err.value)


def test_prepare_cifar_with_wrong_src(tmp_path):
    with pytest.raises(UserError, match='--src'):
        prepare_cifar.main(['--src', str(tmp_path), '--dst', str(tmp_path / 'out')])


# ---- resuming with another mode or another teacher ----------------------------------------------------------
@pytest.mark.slow
def test_resume_without_the_runs_mode_is_refused_naming_it(work, runs, monkeypatch):
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    run = runs['distill']
    for mode in ([], ['--mode', 'copy']):
        with pytest.raises(UserError) as err:
            main_finetune.run(tiny_args(work.data, run.out, '--resume', run.checkpoint, '--finetune', run.teacher,
                                        *mode, epochs=2))
        assert 'the checkpoint is of a --mode distill run' in str(err.value) and 'give --mode distill' in str(err.value)


def test_resume_mode_of_older_checkpoints_none_means_plain():
    for recorded in (None, '', 'none'):
        get_mode('none').check_resumed({'mode': recorded}, 'old.pth')
        with pytest.raises(UserError, match=r"--resume old.pth: the checkpoint is of a --mode none run, but this "
                                            r"command has --mode distill: give --mode none"):
            get_mode('distill').check_resumed({'mode': recorded}, 'old.pth')
    get_mode('distill').check_resumed({}, 'mae_checkpoint.pth')  # records no args of this project: nothing to check


@pytest.mark.slow
def test_resume_with_another_teacher(work, runs, tmp_path, monkeypatch):
    """Resumes of finished one-epoch runs (with --epochs 1 they stop after the checks: nothing to do)."""
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    distill, copy = runs['distill'], runs['copy']

    def resume(run, teacher):
        return main_finetune.run(tiny_args(work.data, run.out, '--resume', run.checkpoint, '--mode',
                                           os.path.basename(run.out), '--finetune', teacher, epochs=1))
    other = str(tmp_path / 'other_teacher.pth')
    make_teacher_checkpoint(other, sharpen=2.0)
    with pytest.raises(UserError) as err:  # distill: the teacher is read from --finetune, not the checkpoint
        resume(distill, other)
    message = str(err.value)
    assert f"--finetune {other} is not the teacher" in message and f"Give --finetune {distill.teacher}" in message

    same_bytes = str(tmp_path / 'moved' / 'teacher.pth')
    os.makedirs(os.path.dirname(same_bytes))
    shutil.copy(distill.teacher, same_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resume(distill, same_bytes) == {}  # the same weights under another path

    with pytest.warns(UserWarning, match='not used when resuming.*the teacher.s weights come from the checkpoint'):
        assert resume(copy, other) == {}  # copy: the checkpoint holds the teacher it uses

    moved = str(tmp_path / 'recorded_teacher_gone.pth')
    shutil.move(distill.teacher, moved)
    try:
        with pytest.warns(UserWarning, match='which no longer exists.*must hold the same weights'):
            assert resume(distill, moved) == {}
    finally:
        shutil.move(moved, distill.teacher)


# ---- a real run: nothing to do, lr floor above the peak -----------------------------------------------------
@pytest.fixture(scope='module')
def floor_run(work):
    """One epoch whose --min_lr is above its peak lr (the seed's copy recipe on too small a batch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main_finetune.run(run_args(work, 'floor', '--blr', '1e-3', '--min_lr', '2e-3', '--warmup_epochs', '0'))
    return SimpleNamespace(out=str(work.root / 'floor'), stdout=out.getvalue(), stderr=err.getvalue())


def test_lr_floor_above_peak_warns_with_numbers_and_fix(floor_run):
    # peak lr = 1e-3 * 8 / 256
    peak = f'{1e-3 * 8 / 256:.2e}'
    assert re.search(rf'WARNING.*--min_lr 2\.00e-03.*above the peak lr {re.escape(peak)}', floor_run.stderr, re.S)
    assert '--accum_iter' in floor_run.stderr and '--lr' in floor_run.stderr


def test_resume_of_a_finished_run_says_nothing_to_do(work, floor_run, capsys, monkeypatch):
    no_long_work(monkeypatch, 'build_dataset')
    ckpt = os.path.join(floor_run.out, 'checkpoint.pth')
    stats = main_finetune.run(run_args(work, 'floor', '--resume', ckpt, epochs=1))
    assert stats == {}
    assert 'nothing to do' in capsys.readouterr().out


# ---- a non-finite loss --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_non_finite_loss_is_one_error_line_naming_the_last_good_checkpoint(work, runs, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    run = runs['distill']
    out = str(tmp_path / 'resumed')
    shutil.copytree(run.out, out)
    poisoned = torch.load(run.teacher, weights_only=True)
    poisoned['model']['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    teacher = str(tmp_path / 'teacher.pth')
    shutil.copy(run.teacher, teacher)
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=False)
    ckpt['args']['finetune'] = teacher  # the run's own teacher file, which then goes bad
    torch.save(ckpt, os.path.join(out, 'checkpoint.pth'))
    torch.save(poisoned, teacher)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main_finetune.run_reporting_stop, tiny_args(
            work.data, out, '--mode', 'distill', '--finetune', teacher, '--resume', 'allow', epochs=2))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith('error: non-finite loss at epoch 1, step 0 of 3: ')
    assert 'loss_atd=nan' in lines[0] and '(--finetune)' in lines[0]
    assert lines[0].endswith(f"the last good checkpoint is {os.path.join(out, 'checkpoint.pth')} (end of epoch 0).")


def test_nan_from_the_atd_term_does_not_blame_the_lr(work):
    bad_teacher = str(work.root / 'nan_teacher.pth')
    ckpt = torch.load(work.teacher, weights_only=True)
    ckpt['model']['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    torch.save(ckpt, bad_teacher)
    with pytest.raises(NonFiniteLossError) as err:
        main_finetune.run(run_args(work, 'nan_atd', '--mode', 'distill', '--finetune', bad_teacher))
    message = str(err.value)
    assert 'loss_atd' in message and 'teacher' in message and 'Lower the learning rate' not in message


# ---- evaluating a model without a head for this task --------------------------------------------------------
@pytest.fixture
def hub_1000_classes(tmp_path, monkeypatch):
    """timm:test_vit.r160_in1k (1000 classes, random weights) in an offline huggingface_hub cache."""
    torch.manual_seed(0)
    save_for_hf(timm.create_model('test_vit', pretrained=False), str(tmp_path / 'test_vit'), safe_serialization=True)
    cache = str(tmp_path / 'hub')
    add_to_hub_cache(cache, 'timm/test_vit.r160_in1k', {name: str(tmp_path / 'test_vit' / name)
                                                         for name in ('config.json', 'model.safetensors')})
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', cache)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    resolve_named.cache_clear()
    yield 'timm:test_vit.r160_in1k'
    resolve_named.cache_clear()


def test_eval_of_weights_without_a_head_for_the_task_is_refused(work, tmp_path, monkeypatch, hub_1000_classes):
    no_long_work(monkeypatch, 'evaluate', 'evaluate_ensemble')
    pretrain = torch.load(work.teacher, weights_only=True)
    pretrain['model'] = {k: v for k, v in pretrain['model'].items() if not k.startswith('head.')}
    mae_pretrain = str(tmp_path / 'mae_pretrain.pth')
    torch.save(pretrain, mae_pretrain)
    out = str(tmp_path / 'eval')

    def evaluate(*flags):
        with pytest.raises(UserError) as err:
            main_finetune.run(['--eval', '--data_path', work.data, '--nb_classes', '3', '--input_size', '32',
                               '--output_dir', out, '--device', 'cpu', '--num_workers', '0', *flags])
        return str(err.value)
    message = evaluate('--finetune', hub_1000_classes)
    assert message.startswith(f"--finetune {hub_1000_classes}: no classifier head for 3 classes was loaded")
    message = evaluate('--finetune', mae_pretrain, '--model', 'vit_base_patch16_224', '--model_kwargs',
                       *[f'{k}={v}' for k, v in TINY_ARCH.items()])
    assert message.startswith(f"--finetune {mae_pretrain}: no classifier head for 3 classes was loaded")
    message = evaluate('--mode', 'copy', '--finetune', work.teacher, '--model', 'vit_base_patch16_224',
                       '--model_kwargs', *[f'{k}={v}' for k, v in TINY_ARCH.items()])
    assert '--eval --mode copy evaluates a trained student' in message and '--resume CKPT' in message
    assert not os.path.exists(os.path.join(out, 'eval_results.json'))


# ---- advice that was not true -------------------------------------------------------------------------------
def test_resuming_the_reference_dual_checkpoint_names_the_real_reason(work, tmp_path, monkeypatch):
    """The reference's dual-model checkpoint holds an optimizer entry, for the dual model's parameters."""
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    student = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH).state_dict()
    teacher = read_checkpoint(work.teacher)['model']
    dual = {**{f'student.{k}': v for k, v in student.items()}, **{f'teacher.{k}': v for k, v in teacher.items()}}
    path = str(tmp_path / 'reference_checkpoint.pth')
    torch.save({'model': dual, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 4,
                'args': argparse.Namespace(mode='distill', model='dual_vit_base_patch16')}, path)
    with pytest.raises(UserError) as err:
        main_finetune.run(tiny_args(work.data, str(tmp_path / 'out'), '--resume', path, '--mode', 'distill',
                                    '--finetune', work.teacher))
    message = str(err.value)
    assert "attention transfer reference's dual model" in message and 'optimizer state does not map' in message
    assert 'no optimizer' not in message


def test_url_naming_no_file_is_reported_as_such(work, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    for url in ('https://host/path/', 'https://host'):
        with pytest.raises(UserError) as err:
            main_finetune.run(tiny_args(work.data, str(tmp_path / 'out'), '--mode', 'distill', '--finetune', url))
        message = str(err.value)
        assert message.startswith(f"{url!r}: the URL names no file") and 'not in the local cache' not in message


# ---- DFND_DeiT-train.py: the reference's flags, refused before the selection scores an image ---------------
@pytest.mark.parametrize('extra, expected', [
    (['--lr_S', '-1'], r"--lr_S -1: the student's learning rate must be > 0"),
    (['--nb_classes', '0'], r"--nb_classes 0: must be >= 1"),
    (['--dataset', 'imagenet'], r"--pos_num 129: class folder .* holds only 1 images; lower --pos_num"),  # its default
    (['--pos_num', '3'], r"--pos_num 3: class folder .* holds only 1 images; lower --pos_num"),
])
def test_dfnd_refuses_what_the_task_cannot_give_before_scoring(tmp_path, monkeypatch, capsys, extra, expected):
    import string

    from test_reference_probe import REFERENCE_LINES, load_dfnd, reference_layout

    import select_wild_data
    from util.errors import run_cli

    v = reference_layout(tmp_path, 'cifar10')  # one training image a class
    monkeypatch.setattr(select_wild_data, 'main', lambda args: pytest.fail('the selection started'))
    monkeypatch.setattr(main_finetune, 'run', lambda argv: pytest.fail('training started'))
    argv = string.Template(REFERENCE_LINES['cifar10']).substitute(v).split() + extra
    with pytest.raises(SystemExit) as end:
        run_cli(load_dfnd().main, argv)
    assert end.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match('error: ' + expected, err[0]), err


def test_dfnd_help_shows_every_default(capsys):
    from test_reference_probe import load_dfnd

    with pytest.raises(SystemExit):
        load_dfnd().main(['--help'])
    blocks = {b.split()[0]: ' '.join(b.split()) for b in re.split(r'\n  (?=-)', capsys.readouterr().out)[1:]}
    for flag, default in (('--num_select', '600000'), ('--nb_classes', '10'), ('--lr_S', '0.00075'),
                          ('--dataset', 'cifar10'), ('--attnlier', '0.05'), ('--outlier', '0.9')):
        assert f'(default: {default}' in blocks[flag], blocks[flag]
