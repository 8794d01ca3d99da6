"""--attention_impl auto (the default): explicit maps on CPU, fused on CUDA, resolved once with the flags,
printed at start and recorded in checkpoints; fused / explicit chosen by hand; checkpoints that record
either (or nothing) evaluate and load as before."""
import json
import os

import pytest
import torch
from helpers import make_image_folder, make_teacher_checkpoint, tiny_args

import main_finetune
from models_attention import resolve_attention_impl
from models_dual_vit import build_dual_vit
from tools.visualize_attention import load_models
from util.pretrained import read_checkpoint


@pytest.mark.parametrize('device,expected', [
    ('cpu', 'explicit'), (torch.device('cpu'), 'explicit'),
    ('cuda', 'fused'), ('cuda:1', 'fused'), (torch.device('cuda', 0), 'fused'),
])
def test_auto_is_explicit_on_cpu_and_fused_on_cuda(device, expected):
    assert resolve_attention_impl('auto', device) == expected
    for impl in ('fused', 'explicit'):  # chosen by hand: kept on every device
        assert resolve_attention_impl(impl, device) == impl
    with pytest.raises(ValueError, match='auto, fused, explicit'):
        resolve_attention_impl('flash', device)


def test_dual_vit_with_auto_runs_the_explicit_path_on_cpu(monkeypatch):
    seen = []
    import models_dual_vit
    monkeypatch.setattr(models_dual_vit, 'transfer_loss',
                        lambda mode, student, teacher, impl, loss: seen.append(impl) or torch.zeros(()))
    model = build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=3, img_size=32, attention_impl='auto',
                           teacher_kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)).train()
    model(torch.randn(2, 3, 32, 32))
    assert seen == ['explicit', 'explicit']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('attention_impl')
    return root, make_image_folder(str(root / 'data'), train_per_class=8, val_per_class=2), \
        make_teacher_checkpoint(str(root / 'teacher.pth'))


def train(runs, name, *extra, monkeypatch, capsys):
    root, data, teacher = runs
    built = []
    build = main_finetune.build_model
    monkeypatch.setattr(main_finetune, 'build_model', lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    out = str(root / name)
    main_finetune.run(tiny_args(data, out, '--finetune', teacher, '--mode', 'copy', *extra, epochs=1))
    monkeypatch.undo()
    return out, built[-1], capsys.readouterr().out


@pytest.mark.slow
def test_cli_auto_on_cpu_trains_explicit_and_records_it(runs, monkeypatch, capsys):
    out, model, printed = train(runs, 'auto', monkeypatch=monkeypatch, capsys=capsys)
    assert 'attention: explicit (--attention_impl auto on cpu)' in printed
    assert model.attention_impl == 'explicit'
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['args']['attention_impl'] == 'explicit'


@pytest.mark.slow
def test_cli_fused_by_hand_and_its_checkpoint_evaluates_with_auto(runs, monkeypatch, capsys):
    out, model, printed = train(runs, 'fused', '--attention_impl', 'fused', monkeypatch=monkeypatch, capsys=capsys)
    assert model.attention_impl == 'fused' and 'attention_impl auto' not in printed
    ckpt_path = os.path.join(out, 'checkpoint.pth')
    assert read_checkpoint(ckpt_path)['args']['attention_impl'] == 'fused'
    with open(os.path.join(out, 'log.txt')) as f:
        logged = json.loads(f.readline())
    # --eval takes the model's arguments from the checkpoint, not the attention path: auto picks explicit here,
    # and the copy model (teacher included) gives the accuracy and loss the fused run logged
    _, data, _ = runs
    built = []
    build = main_finetune.build_model
    monkeypatch.setattr(main_finetune, 'build_model', lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    stats = main_finetune.run(['--eval', '--resume', ckpt_path, '--data_path', data, '--device', 'cpu',
                               '--num_workers', '0', '--output_dir', str(runs[0] / 'fused_eval')])
    assert built[-1].attention_impl == 'explicit'
    assert stats['test_acc1'] == pytest.approx(logged['test_acc1'])
    assert stats['test_loss'] == pytest.approx(logged['test_loss'], rel=1e-5)


def test_resolve_args_gives_fused_for_a_cuda_run(runs, tmp_path):
    _, data, teacher = runs
    parser = main_finetune.get_args_parser()
    args = parser.parse_args(tiny_args(data, str(tmp_path / 'out'), '--finetune', teacher, '--mode', 'distill',
                                       '--device', 'cuda'))
    assert args.attention_impl == 'auto'
    assert main_finetune.resolve_args(args).cfg.attention_impl == 'fused'


@pytest.mark.slow
def test_checkpoint_without_attention_impl_still_loads(runs, monkeypatch, capsys, tmp_path):
    """A checkpoint older than the flag and the model description records neither attention_impl nor model_spec:
    tools rebuild the run's model from the flags it records, to the same description."""
    out, _, _ = train(runs, 'old', monkeypatch=monkeypatch, capsys=capsys)
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    recorded = ckpt['args'].pop('model_spec')
    del ckpt['args']['attention_impl']
    old = str(tmp_path / 'old.pth')
    torch.save(ckpt, old)
    teacher, student, spec, _ = load_models(old, None)
    assert teacher is not None and spec.to_record() == recorded


@pytest.mark.parametrize('recorded,expected', [({'map_average': 'examples'}, 'explicit'),
                                               ({'transfer_loss': 'js'}, 'explicit'), ({}, 'auto')])
def test_auto_follows_the_evaluated_checkpoints_maps_not_the_flags(recorded, expected):
    """--eval --resume of a checkpoint trained with averaged maps or a loss without a fused path: auto picks the
    explicit attention from the checkpoint's description (the flags' defaults say none), on CUDA as on CPU."""
    from models_spec import Architecture, ModelSpec
    from util.config import Config

    arch = Architecture.of('vit_base_patch16_224', {}, True)
    spec = ModelSpec(mode='copy' if 'map_average' in recorded else 'distill', student=arch, teacher=arch,
                     num_classes=3, img_size=32, **recorded)
    cfg = Config.of(main_finetune.get_args_parser().parse_args(['--attention_impl', 'auto']))
    assert main_finetune.attention_impl_for(cfg.attention_impl, spec.map_average, spec.transfer_loss) == expected
    assert main_finetune.attention_impl_for(cfg.attention_impl, cfg.map_average, cfg.transfer_loss) == 'auto'
