"""Bad input answered by one clear `error:` paragraph (a UserError), found before any training; bugs keep
their traceback."""
import contextlib
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import ROOT, TINY_ARCH, kwargs_flags, tiny_args
from PIL import Image

import main_finetune
import select_wild_data
from engine_finetune import NonFiniteLossError
from models_dual_vit import create_vit
from tools import export_student, prepare_cifar
from util.datasets import DataError
from util.errors import DEBUG_ENV, UserError, run_cli
from util.pretrained import CheckpointMismatchError

ENTRY_POINTS = ['main_finetune.py', 'select_wild_data.py', 'submitit_finetune.py', 'demo.py',
                'tools/export_student.py', 'tools/prepare_cifar.py', 'tools/prepare_tinyimagenet.py',
                'tools/visualize_attention.py']


@pytest.fixture(scope='module')
def work(workdir, shared_images):
    """The shared teacher, 8 training and 3 validation images a class, and this module's output folder."""
    return SimpleNamespace(root=workdir.root, data=shared_images(train_per_class=8, val_per_class=3),
                           teacher=workdir.teacher)


def args_for(work, name, *extra, epochs=1):
    return tiny_args(work.data, str(work.root / name), *extra, epochs=epochs)


def user_error(argv) -> str:
    with pytest.raises(UserError) as err:
        main_finetune.run(argv)
    return str(err.value)


# ---- reporting ---------------------------------------------------------------------------------
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
    cmd = [sys.executable, os.path.join(ROOT, 'main_finetune.py'), *args_for(work, 'cli', '--drop_path', '1.5')]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    assert out.stderr.startswith('error: --drop_path 1.5'), out.stderr
    assert not os.path.exists(work.root / 'cli')  # nothing written


# ---- errors that escaped raw -------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, match', [
    (['bogus_arg=1'], 'bogus_arg'), (['depth=four'], 'depth'), (['num_heads=5'], 'num_heads'),
])
def test_bad_model_kwargs(work, kwargs, match):
    argv = args_for(work, 'kw') + ['--model_kwargs', *kwargs_flags(TINY_ARCH), *kwargs]
    message = user_error(argv)
    assert '--model_kwargs' in message and match in message


def test_model_that_is_not_a_vit(work):
    message = user_error(args_for(work, 'resnet') + ['--model', 'resnet18', '--model_kwargs'])
    assert 'resnet18' in message and '--model' in message and 'VisionTransformer' in message


def test_truncated_safetensors_names_the_file(work):
    path = str(work.root / 'teacher.safetensors')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    safetensors.torch.save_file(vit.state_dict(), path)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    message = user_error(args_for(work, 'trunc', '--finetune', path))
    assert path in message and '--finetune' in message


def test_resume_of_weights_only_file_points_to_finetune(work):
    path = str(work.root / 'weights_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict()}, path)
    message = user_error(args_for(work, 'weights_only', '--resume', path))
    assert path in message and '--finetune' in message and 'optimizer' in message


def test_checkpoint_with_only_model_ema_points_to_use_teacher_ema(work):
    path = str(work.root / 'ema_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model_ema': vit.state_dict()}, path)
    message = user_error(args_for(work, 'ema_only', '--finetune', path))
    assert path in message and '--use_teacher_ema' in message


def test_selection_that_is_not_a_selection_file(work):
    path = str(work.root / 'not_a_selection.pth')
    torch.save({'something': torch.zeros(2)}, path)
    message = user_error(args_for(work, 'bad_sel', '--mode', 'probe', '--finetune', work.teacher,
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


# ---- values checked before any training --------------------------------------------------------
@pytest.mark.parametrize('flag, value', [
    ('--epochs', '0'), ('--atd_weight', '-1'), ('--atd_weight', 'nan'), ('--atd_weight', 'inf'),
    ('--drop_path', '1'), ('--drop_path', '-0.1'), ('--smoothing', '1'), ('--min_crop_scale', '0'),
    ('--min_crop_scale', '1.5'), ('--hflip', '1.5'),
])
def test_out_of_range_values(work, flag, value, monkeypatch):
    monkeypatch.setattr(main_finetune, 'train_one_epoch', lambda *a, **k: pytest.fail('training started'))
    message = user_error(args_for(work, 'values', '--mode', 'distill', '--finetune', work.teacher, flag, value))
    assert f'{flag} {value}' in message


def test_end_layer_above_zero(work):
    message = user_error(args_for(work, 'end', '--mode', 'distill', '--finetune', work.teacher, '--end_layer', '1'))
    assert '--end_layer 1' in message and 'first -' not in message


def test_transfer_layers_reversed_range_does_not_blame_end_layer(work):
    message = user_error(args_for(work, 'tl', '--mode', 'distill', '--finetune', work.teacher,
                                  '--transfer_layers', '3-1'))
    assert '--transfer_layers' in message and '1-3' in message and 'end_layer' not in message


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


# ---- a real run: nothing to do, lr floor above the peak, the atd term's NaN ------------------------
@pytest.fixture(scope='module')
def floor_run(work):
    """One epoch whose --min_lr is above its peak lr (the seed's copy recipe on too small a batch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main_finetune.run(args_for(work, 'floor', '--blr', '1e-3', '--min_lr', '2e-3', '--warmup_epochs', '0'))
    return SimpleNamespace(out=str(work.root / 'floor'), stdout=out.getvalue(), stderr=err.getvalue())


def test_lr_floor_above_peak_warns_with_numbers_and_fix(floor_run):
    # peak lr = 1e-3 * 8 / 256
    peak = f'{1e-3 * 8 / 256:.2e}'
    assert re.search(rf'WARNING.*--min_lr 2\.00e-03.*above the peak lr {re.escape(peak)}', floor_run.stderr, re.S)
    assert '--accum_iter' in floor_run.stderr and '--lr' in floor_run.stderr


def test_resume_of_a_finished_run_says_nothing_to_do(work, floor_run, capsys, monkeypatch):
    monkeypatch.setattr(main_finetune, 'build_dataset', lambda *a, **k: pytest.fail('data loaded'))
    ckpt = os.path.join(floor_run.out, 'checkpoint.pth')
    stats = main_finetune.run(args_for(work, 'floor', '--resume', ckpt, epochs=1))
    assert stats == {}
    assert 'nothing to do' in capsys.readouterr().out


def test_nan_from_the_atd_term_does_not_blame_the_lr(work):
    bad_teacher = str(work.root / 'nan_teacher.pth')
    ckpt = torch.load(work.teacher, weights_only=True)
    ckpt['model']['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    torch.save(ckpt, bad_teacher)
    with pytest.raises(NonFiniteLossError) as err:
        main_finetune.run(args_for(work, 'nan_atd', '--mode', 'distill', '--finetune', bad_teacher))
    message = str(err.value)
    assert 'loss_atd' in message and 'teacher' in message and 'Lower the learning rate' not in message
