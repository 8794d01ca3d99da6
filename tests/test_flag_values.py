"""main_finetune.py's flag values checked before any work (no data read, no model built, no training): one
UserError naming the flag, the value and the fix; numbers out of range, --end_layer / --transfer_layers,
--model_kwargs timm does not take, a --model that is not a ViT."""
import pytest
from helpers import TINY_ARCH, kwargs_flags, no_long_work, run_args, tiny_args, user_error

import engine_finetune
import main_finetune
from util.errors import UserError


# ---- values of main_finetune.py checked before any work ------------------------------------------------------------
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
def test_numeric_flags_are_refused_before_any_work(small_work, tmp_path, monkeypatch, extra, expected):
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    argv = tiny_args(small_work.data, str(tmp_path / 'out'), '--finetune', small_work.teacher, *extra)
    with pytest.raises(UserError) as err:
        main_finetune.run(argv)
    assert str(err.value).startswith(expected) or expected in str(err.value), str(err.value)


@pytest.mark.parametrize('flag, value', [
    ('--epochs', '0'), ('--atd_weight', '-1'), ('--atd_weight', 'nan'), ('--atd_weight', 'inf'),
    ('--drop_path', '1'), ('--drop_path', '-0.1'), ('--smoothing', '1'), ('--min_crop_scale', '0'),
    ('--min_crop_scale', '1.5'), ('--hflip', '1.5'),
])
def test_out_of_range_values(small_work, flag, value, monkeypatch):
    monkeypatch.setattr(engine_finetune, 'train_one_epoch', lambda *a, **k: pytest.fail('training started'))
    message = user_error(run_args(small_work, 'values', '--mode', 'distill', '--finetune', small_work.teacher, flag,
                                  value))
    assert f'{flag} {value}' in message


def test_end_layer_above_zero(small_work):
    message = user_error(run_args(small_work, 'end', '--mode', 'distill', '--finetune', small_work.teacher,
                                  '--end_layer', '1'))
    assert message.startswith('--end_layer: 1: must be <= 0') and 'first -' not in message


def test_transfer_layers_reversed_range_does_not_blame_end_layer(small_work):
    message = user_error(run_args(small_work, 'tl', '--mode', 'distill', '--finetune', small_work.teacher,
                                  '--transfer_layers', '3-1'))
    assert '--transfer_layers' in message and '1-3' in message and 'end_layer' not in message


@pytest.mark.parametrize('kwargs, match', [
    (['bogus_arg=1'], 'bogus_arg'), (['depth=four'], 'depth'), (['num_heads=5'], 'num_heads'),
])
def test_bad_model_kwargs(small_work, kwargs, match):
    argv = run_args(small_work, 'kw') + ['--model_kwargs', *kwargs_flags(TINY_ARCH), *kwargs]
    message = user_error(argv)
    assert '--model_kwargs' in message and match in message


def test_model_that_is_not_a_vit(small_work):
    message = user_error(run_args(small_work, 'resnet') + ['--model', 'resnet18', '--model_kwargs'])
    assert 'resnet18' in message and '--model' in message and 'VisionTransformer' in message
