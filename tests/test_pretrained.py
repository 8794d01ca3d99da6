"""Loading checkpoints: MAE / DeiT / timm / safetensors formats, pos-embed resampling, clear mismatch errors,
and the attention transfer reference's checkpoints (the whole dual model)."""
import argparse
import copy
import os
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from helpers import (
    DATA_DEFAULTS,
    TINY,
    TINY_ARCH,
    add_to_hub_cache,
    kwargs_flags,
    no_long_work,
    run_args,
    tiny_args,
    user_error,
)
from timm.models import save_for_hf

import main_finetune
from models_dual_vit import DualViT, build_dual_vit
from models_vit import create_vit
from tools import export_student
from util.datasets import build_dataset
from util.errors import UserError
from util.pretrained import CheckpointMismatchError, load_pretrained_weights, read_checkpoint, resolve_named


def encoder(img_size=32, pool='token', **kw):
    return create_vit('vit_base_patch16_224', num_classes=0, global_pool=pool, img_size=img_size, **{**TINY_ARCH, **kw})


def mae_pretrain_checkpoint(src):
    """What MAE's pre-training writes: encoder keys in timm layout, final norm, the decoder, args."""
    model = dict(src.state_dict())
    model['mask_token'] = torch.randn(1, 1, 32)
    model['decoder_embed.weight'] = torch.randn(32, 48)
    model['decoder_pos_embed'] = torch.randn(1, 10, 32)
    model['decoder_blocks.0.attn.qkv.weight'] = torch.randn(96, 32)
    return {'model': model, 'args': argparse.Namespace(model='mae_vit_base_patch16', mask_ratio=0.75), 'epoch': 799}


def test_mae_pretrain_checkpoint_with_decoder_and_other_grid_loads(tmp_path):
    src = encoder(img_size=24)  # 3x3 grid
    path = tmp_path / 'mae_pretrain_vit_tiny.pth'
    torch.save(mae_pretrain_checkpoint(src), path)

    dual = build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=5, img_size=32, teacher_kwargs=TINY_ARCH)
    # the teacher's grid is 4x4 and it pools with fc_norm: norm.* is classifier side
    report = load_pretrained_weights(dual.teacher, str(path))
    for k, v in src.state_dict().items():
        if k.startswith('blocks.') or k.startswith('patch_embed.') or k == 'cls_token':
            torch.testing.assert_close(dual.teacher.state_dict()[k], v, rtol=0, atol=0)
    # independent resampling: bicubic over the patch grid, the class token's embedding kept
    pos = src.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 3, 3, 48).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False)
    expected = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 16, 48)], dim=1)
    torch.testing.assert_close(dual.teacher.pos_embed.detach(), expected, rtol=1e-5, atol=1e-6)
    assert any('norm.weight' in line for line in report.lines) and 'blocks.0.attn.qkv.weight' in report.loaded
    assert all(not p.requires_grad for p in dual.teacher.parameters())


def test_teacher_ema_entry_and_its_absence(tmp_path):
    src, ema = encoder(), encoder()
    path = tmp_path / 'ft.pth'
    torch.save({'model': src.state_dict(), 'model_ema': ema.state_dict()}, path)
    target = encoder()
    load_pretrained_weights(target, str(path), use_ema=True)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    load_pretrained_weights(target, str(path), use_ema=False)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight, rtol=0, atol=0)

    torch.save({'model': src.state_dict()}, path)
    with pytest.raises(UserError, match='no EMA weights.*--use_teacher_ema'):
        load_pretrained_weights(target, str(path), use_ema=True)


def test_safetensors_plain_and_ddp_prefixed_state_dicts(tmp_path):
    src = encoder()
    st = tmp_path / 'model.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    ddp = tmp_path / 'ddp.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in src.state_dict().items()}}, ddp)
    for path in (st, ddp):
        target = encoder()
        load_pretrained_weights(target, str(path))
        for k, v in src.state_dict().items():
            torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0)


def test_finetuned_checkpoint_with_other_head_keeps_own_head(tmp_path):
    src = create_vit('vit_base_patch16_224', num_classes=1000, global_pool='avg', **TINY)
    path = tmp_path / 'deit_style.pth'
    torch.save({'model': src.state_dict()}, path)
    target = create_vit('vit_base_patch16_224', num_classes=5, global_pool='avg', **TINY)
    head = target.head.weight.detach().clone()
    report = load_pretrained_weights(target, str(path))
    assert torch.equal(target.head.weight, head)
    assert torch.equal(target.fc_norm.weight, src.fc_norm.weight)
    assert any('head.weight' in line for line in report.lines) and 'head.weight' not in report.loaded


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    wider = encoder(embed_dim=96)
    path = tmp_path / 'wider.pth'
    torch.save({'model': wider.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_weights(encoder(), str(path))
    msg = str(err.value)
    assert 'shapes that differ' in msg and 'blocks.0.attn.qkv.weight: checkpoint (288, 96) vs model (144, 48)' in msg

    sd = encoder().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith('blocks.3.')}
    sd['blocks.7.attn.qkv.weight'] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_weights(encoder(), str(path))
    msg = str(err.value)
    assert 'missing keys' in msg and 'blocks.3.attn.qkv.weight' in msg
    assert 'unexpected keys (1): blocks.7.attn.qkv.weight' in msg


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read the checkpoint'):
        load_pretrained_weights(encoder(), str(bad))
    with pytest.raises(UserError, match='nowhere.pth'):
        load_pretrained_weights(encoder(), str(tmp_path / 'nowhere.pth'))


# ---- checkpoints of the attention transfer reference (the whole dual model) -------------------------------
def reference_checkpoint(path: str, mode: str) -> DualViT:
    """A checkpoint in the reference's layout: model = teacher.* and student.* of the dual model,
    model_ema = the EMA of the dual model (ModelEmaV2: module.*), args = a Namespace whose end_layer
    the released code ignored (its model transfers depth - 3 layers)."""
    torch.manual_seed(1)
    dual = build_dual_vit('vit_base_patch16_224', mode=mode, num_classes=3, img_size=32, end_layer=-3,
                          teacher_kwargs=TINY_ARCH)
    ema = copy.deepcopy(dual)
    with torch.no_grad():
        for p in ema.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {**{f'teacher.{k}': v for k, v in dual.teacher.state_dict().items()},
             **{f'student.{k}': v for k, v in dual.student.state_dict().items()}}
    ema_state = {f'module.teacher.{k}': v for k, v in ema.teacher.state_dict().items()}
    ema_state.update({f'module.student.{k}': v for k, v in ema.student.state_dict().items()})
    args = argparse.Namespace(model='vit_base_patch16_224', mode=mode, nb_classes=3, input_size=32, global_pool=True,
                              end_layer=-1, drop_path=0.1, model_kwargs=TINY_ARCH)
    torch.save({'model': state, 'model_ema': ema_state, 'optimizer': {'state': {}, 'param_groups': []},
                'epoch': 99, 'scaler': {}, 'args': args}, path)
    dual.ema_student = ema.student
    return dual


def expected_eval(model, data: str) -> tuple[float, float]:
    """Mean cross-entropy and top-1 of ``model`` on data/val, images as they are (32x32 at input 32)."""
    dataset = build_dataset(False, SimpleNamespace(**{**DATA_DEFAULTS, 'eval_crop_pct': 1.0}, input_size=32,
                                                   nb_classes=3, data_path=data))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).float().mean().item()


def test_reference_checkpoints_evaluate_finetune_ensemble_and_export(shared_images, tmp_path):
    data = shared_images(classes=3, train_per_class=1, val_per_class=6)
    copy_path, distill_path = str(tmp_path / 'copy.pth'), str(tmp_path / 'distill.pth')
    copy_model, distill_model = reference_checkpoint(copy_path, 'copy'), reference_checkpoint(distill_path, 'distill')
    common = ['--data_path', data, '--device', 'cpu', '--num_workers', '0', '--model_kwargs', *kwargs_flags(TINY_ARCH)]

    # --eval --resume: the copy student runs beside the teacher in the released code's 1 of 4 layers
    stats = main_finetune.run(['--eval', '--resume', copy_path, *common])
    assert copy_model.layers == [0]
    loss, acc = expected_eval(copy_model, data)
    assert stats['test_loss'] == pytest.approx(loss, rel=1e-5) and stats['test_acc1'] == pytest.approx(acc)
    ema_loss, _ = expected_eval(copy_model.with_student(copy_model.ema_student), data)
    assert stats['ema_test_loss'] == pytest.approx(ema_loss, rel=1e-5) and abs(ema_loss - loss) > 1e-4

    # a distill student evaluates alone; --ensemble_with reads the same layout
    stats = main_finetune.run(['--eval', '--resume', distill_path, *common, '--ensemble_with', distill_path])
    loss, acc = expected_eval(distill_model.student, data)
    assert stats['test_loss'] == pytest.approx(loss, rel=1e-5)
    assert stats['ensemble_test_loss'] == pytest.approx(loss, rel=1e-5)

    # --finetune takes the student
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    load_pretrained_weights(vit, distill_path)
    for k, v in distill_model.student.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k

    # export: the EMA student, as a standalone timm model
    export_student.export(distill_path, str(tmp_path / 'exported'), use_ema=True)
    exported = timm.create_model('local-dir:' + str(tmp_path / 'exported'), pretrained=True)
    for k, v in distill_model.ema_student.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k

    # training cannot continue from it (the optimizer state is the dual model's): a clear error
    args = main_finetune.get_args_parser().parse_args(tiny_args(data, str(tmp_path / 'out'), '--resume', copy_path))
    with pytest.raises(UserError, match='--resume'):
        main_finetune.resolve_args(args)


def test_moco_v3_and_dino_checkpoint_layouts_load_their_encoder(tmp_path):
    """MoCo v3 (state_dict: module.base_encoder.* beside module.momentum_encoder.* and module.predictor.*) and
    DINO (teacher / student entries: backbone.* beside the projection head.*; the teacher is loaded)."""
    base, momentum, dino_teacher, dino_student = encoder(), encoder(), encoder(), encoder()
    moco = {'state_dict': {**{'module.base_encoder.' + k: v for k, v in base.state_dict().items()},
                           'module.base_encoder.head.0.weight': torch.randn(8, 48),
                           **{'module.momentum_encoder.' + k: v for k, v in momentum.state_dict().items()},
                           'module.predictor.0.weight': torch.randn(8, 8)}, 'arch': 'vit_small', 'epoch': 300}
    dino = {'teacher': {**{'backbone.' + k: v for k, v in dino_teacher.state_dict().items()},
                        'head.mlp.0.weight': torch.randn(8, 48)},
            'student': {**{'module.backbone.' + k: v for k, v in dino_student.state_dict().items()},
                        'module.head.mlp.0.weight': torch.randn(8, 48)}, 'epoch': 100}
    for name, ckpt, expected in (('moco.pth.tar', moco, base), ('dino.pth', dino, dino_teacher)):
        torch.save(ckpt, tmp_path / name)
        target = encoder()
        report = load_pretrained_weights(target, str(tmp_path / name))
        for k, v in expected.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), (name, k)
        assert 'blocks.0.attn.qkv.weight' in report.loaded


def test_a_resampled_position_embedding_is_reported(tmp_path):
    """Weights of a 32 px model (4 x 4 patches of 8) loaded into a 48 px one: the grid is resampled, and the load
    report says so; at the same size it says nothing of it."""
    from helpers import make_teacher_checkpoint

    path = make_teacher_checkpoint(str(tmp_path / 't.pth'))
    wider = create_vit('vit_base_patch16_224', num_classes=3, global_pool='avg', img_size=48, **TINY_ARCH)
    assert 'position embedding resampled (bicubic) from 4 x 4 to 6 x 6 patches' in str(
        load_pretrained_weights(wider, path))
    same = create_vit('vit_base_patch16_224', num_classes=3, global_pool='avg', img_size=32, **TINY_ARCH)
    assert 'position embedding' not in str(load_pretrained_weights(same, path))


# ---- moved from test_bad_input.py: files that are not what the flag needs, weights without a head ------------------
def test_truncated_safetensors_names_the_file(small_work):
    path = str(small_work.root / 'teacher.safetensors')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    safetensors.torch.save_file(vit.state_dict(), path)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    message = user_error(run_args(small_work, 'trunc', '--finetune', path))
    assert path in message and '--finetune' in message


def test_resume_of_weights_only_file_points_to_finetune(small_work):
    path = str(small_work.root / 'weights_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict()}, path)
    message = user_error(run_args(small_work, 'weights_only', '--resume', path))
    assert path in message and '--finetune' in message and 'optimizer' in message


def test_checkpoint_with_only_model_ema_points_to_use_teacher_ema(small_work):
    path = str(small_work.root / 'ema_only.pth')
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model_ema': vit.state_dict()}, path)
    message = user_error(run_args(small_work, 'ema_only', '--finetune', path))
    assert path in message and '--use_teacher_ema' in message


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


def test_eval_of_weights_without_a_head_for_the_task_is_refused(small_work, tmp_path, monkeypatch, hub_1000_classes):
    no_long_work(monkeypatch, 'evaluate', 'evaluate_ensemble')
    pretrain = torch.load(small_work.teacher, weights_only=True)
    pretrain['model'] = {k: v for k, v in pretrain['model'].items() if not k.startswith('head.')}
    mae_pretrain = str(tmp_path / 'mae_pretrain.pth')
    torch.save(pretrain, mae_pretrain)
    out = str(tmp_path / 'eval')

    def evaluate(*flags):
        with pytest.raises(UserError) as err:
            main_finetune.run(['--eval', '--data_path', small_work.data, '--nb_classes', '3', '--input_size', '32',
                               '--output_dir', out, '--device', 'cpu', '--num_workers', '0', *flags])
        return str(err.value)
    message = evaluate('--finetune', hub_1000_classes)
    assert message.startswith(f"--finetune {hub_1000_classes}: no classifier head for 3 classes was loaded")
    message = evaluate('--finetune', mae_pretrain, '--model', 'vit_base_patch16_224', '--model_kwargs',
                       *[f'{k}={v}' for k, v in TINY_ARCH.items()])
    assert message.startswith(f"--finetune {mae_pretrain}: no classifier head for 3 classes was loaded")
    message = evaluate('--mode', 'copy', '--finetune', small_work.teacher, '--model', 'vit_base_patch16_224',
                       '--model_kwargs', *[f'{k}={v}' for k, v in TINY_ARCH.items()])
    assert '--eval --mode copy evaluates a trained student' in message and '--resume CKPT' in message
    assert not os.path.exists(os.path.join(out, 'eval_results.json'))


def test_resuming_the_reference_dual_checkpoint_names_the_real_reason(small_work, tmp_path, monkeypatch):
    """The reference's dual-model checkpoint holds an optimizer entry, for the dual model's parameters."""
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    student = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH).state_dict()
    teacher = read_checkpoint(small_work.teacher)['model']
    dual = {**{f'student.{k}': v for k, v in student.items()}, **{f'teacher.{k}': v for k, v in teacher.items()}}
    path = str(tmp_path / 'reference_checkpoint.pth')
    torch.save({'model': dual, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 4,
                'args': argparse.Namespace(mode='distill', model='dual_vit_base_patch16')}, path)
    with pytest.raises(UserError) as err:
        main_finetune.run(tiny_args(small_work.data, str(tmp_path / 'out'), '--resume', path, '--mode', 'distill',
                                    '--finetune', small_work.teacher))
    message = str(err.value)
    assert "attention transfer reference's dual model" in message and 'optimizer state does not map' in message
    assert 'no optimizer' not in message
