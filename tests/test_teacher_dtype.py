"""--teacher_dtype: the frozen teacher's weights held in bf16 where the run computes in bf16 (util.precision).

Under bf16 autocast the teacher's matrix products read their weights in bf16 anyway; holding them in bf16 also
rounds what autocast leaves in float32 (layer norms, position embedding, class token, the residual adds): one
more bf16 rounding of the same size as autocast's own. The tolerances: against the float32 computation, the
teacher's maps with the weights held in bf16 are off (mean absolute difference) by at most twice what bf16
autocast alone makes them, which every bf16 run already accepts (measured: 1.16 to 1.37 times over five seeds);
the transfer loss, a mean over every query row whose per-row errors partly cancel, by at most bf16's unit
roundoff 2^-8 relative (measured: up to 1.6e-3 over five seeds)."""
import copy
import os
import re

import pytest
import torch
from helpers import args_for, user_error
from test_experiments import pair

import main_finetune
from models_attention import forward_with_capture
from util.precision import hold_teacher, parameter_bytes
from util.pretrained import read_checkpoint

BF16 = dict(device_type='cpu', dtype=torch.bfloat16)


def held_and_float32(mode, impl):
    torch.manual_seed(0)
    model = pair(mode, impl).train()
    held = copy.deepcopy(model)
    line = hold_teacher(held.teacher, 'bf16')
    return model, held, line


def teacher_maps(teacher, x, autocast=True):
    with torch.no_grad(), torch.autocast(**BF16, enabled=autocast):
        return forward_with_capture(teacher, x, attention_blocks=[0, 1, 2])[1]


def mean_difference(a, b):
    return max((a[i].float() - b[i].float()).abs().mean().item() for i in a)


def test_teacher_parameters_held_at_half_the_bytes():
    model, held, line = held_and_float32('distill', 'fused')
    before, after = parameter_bytes(model.teacher), parameter_bytes(held.teacher)
    assert after * 2 == before
    assert {p.dtype for p in held.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in held.student.parameters()} == {torch.float32}
    assert line == (f"teacher: weights held in bf16 (--teacher_dtype), {after / 2**20:.1f} MiB instead of "
                    f"{before / 2**20:.1f} MiB")
    assert hold_teacher(model.teacher, 'float32') is None and parameter_bytes(model.teacher) == before


@pytest.mark.parametrize('impl', ['explicit', 'fused'])
def test_held_teacher_moves_maps_and_loss_no_more_than_bf16_autocast_does(impl):
    model, held, _ = held_and_float32('distill', impl)
    x = torch.randn(4, 3, 32, 32)
    exact, autocast, with_held = (teacher_maps(model.teacher, x, autocast=False), teacher_maps(model.teacher, x),
                                  teacher_maps(held.teacher, x))
    assert mean_difference(with_held, autocast) > 0  # the held weights are used
    assert mean_difference(with_held, exact) <= 2 * mean_difference(autocast, exact)
    with torch.no_grad():
        loss_exact = model(x)[1]
        with torch.autocast(**BF16):
            loss_autocast, loss_held = model(x)[1], held(x)[1]
    assert loss_held != loss_autocast
    assert abs(loss_held - loss_exact) <= 2 ** -8 * loss_exact


def test_copy_run_holds_its_teacher_in_bf16_and_evaluates_it_again(workdir, tmp_path, capsys):
    out = str(tmp_path / 'copy')
    stats = main_finetune.run(args_for(workdir, out, '--mode', 'copy', '--amp', 'bf16', epochs=1))
    assert "teacher: weights held in bf16 (--teacher_dtype)" in capsys.readouterr().out
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert {v.dtype for v in ckpt['teacher'].values() if v.is_floating_point()} == {torch.bfloat16}
    assert ckpt['args']['teacher_dtype'] == 'bf16'
    evaluated = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--amp', 'bf16',
                                   '--data_path', workdir.data, '--output_dir', str(tmp_path / 'eval'), '--device',
                                   'cpu', '--num_workers', '0'])
    assert evaluated['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-6)
    resumed = main_finetune.run(args_for(workdir, out, '--mode', 'copy', '--amp', 'bf16', '--resume', 'allow'))
    assert resumed['epoch'] == 1


@pytest.mark.parametrize('mode', ['distill', 'feature_kd', 'logit_kd'])
def test_each_teacher_mode_trains_with_a_bf16_teacher(workdir, tmp_path, capsys, mode):
    stats = main_finetune.run(args_for(workdir, str(tmp_path / mode), '--mode', mode, '--amp', 'bf16', epochs=1))
    assert "teacher: weights held in bf16" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor(stats['train_loss']))


@pytest.mark.parametrize('flags,message', [
    (['--mode', 'distill', '--teacher_dtype', 'bf16'], "^--teacher_dtype bf16 holds .* --amp none: add --amp bf16"),
    (['--teacher_dtype', 'float32'], "^--teacher_dtype float32: --mode none has no teacher: drop it$"),
])
def test_teacher_dtype_refusals(workdir, tmp_path, flags, message):
    assert re.search(message, user_error(args_for(workdir, tmp_path / 'out', *flags)))
