"""Fidelity to what the authors ran (issue 12): each test compares with a computation written here
from the stated rule, not with the code under test."""
import argparse
import copy
import importlib.util
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY_KWARGS, make_image_folder, make_teacher_checkpoint, tiny_args
from PIL import Image
from torchvision import transforms

import main_finetune
import select_wild_data
from models_dual_vit import DualViT, build_dual_vit, create_vit
from modes import get_mode, probe_epochs
from tools import export_student
from util.args import explicit_flags
from util.datasets import build_dataset
from util.errors import UserError
from util.lr_sched import lr_at
from util.pretrained import load_pretrained_weights, read_checkpoint
from util.selection import training_class_weights

ARCH = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


# ---- layer-wise lr decay: the reference's grouping in transfer modes, MAE's in plain training ----------
# Exponent of layer_decay per parameter-name prefix, written out for a 4-block student.
# Transfer modes (the reference's dual-model grouping, num_layers = depth = 4): block i -> 4 - 1 - i,
# the last block and the head 0, embeddings 4. Plain (MAE, num_layers = depth + 1 = 5): block i -> 4 - i,
# the head 0, embeddings 5.
TRANSFER_EXPONENTS = {'cls_token': 4, 'pos_embed': 4, 'patch_embed.': 4, 'blocks.0.': 3, 'blocks.1.': 2,
                      'blocks.2.': 1, 'blocks.3.': 0, 'fc_norm.': 0, 'head.': 0}
PLAIN_EXPONENTS = {'cls_token': 5, 'pos_embed': 5, 'patch_embed.': 5, 'blocks.0.': 4, 'blocks.1.': 3,
                   'blocks.2.': 2, 'blocks.3.': 1, 'fc_norm.': 0, 'head.': 0}


@pytest.mark.parametrize('mode,table', [('copy', TRANSFER_EXPONENTS), ('distill', TRANSFER_EXPONENTS),
                                        (None, PLAIN_EXPONENTS)])
def test_layer_decay_scales_per_parameter_name(mode, table):
    decay = 0.75
    model = build_dual_vit('vit_base_patch16_224' if mode else None, 'vit_base_patch16_224', mode=mode,
                           num_classes=3, img_size=32, teacher_kwargs=ARCH, student_kwargs=ARCH)
    args = SimpleNamespace(mode=mode, weight_decay=0.05, layer_decay=decay)
    groups = main_finetune.param_groups(model, get_mode(mode), args)
    scale = {name: g['lr_scale'] for g in groups for name in g['names']}
    assert set(scale) == {n for n, _ in model.student.named_parameters()}
    for name, value in scale.items():
        prefix = next(p for p in table if name.startswith(p))
        assert value == pytest.approx(decay ** table[prefix], rel=1e-12), name


# ---- the student's class token: std 0.02 in transfer modes (the reference), timm's 1e-6 otherwise ------
@pytest.mark.parametrize('mode', ['copy', 'distill', None])
def test_student_class_token_initialisation(mode):
    torch.manual_seed(0)
    arch = dict(patch_size=16, embed_dim=768, depth=1, num_heads=12)
    model = build_dual_vit('vit_base_patch16_224' if mode else None, 'vit_base_patch16_224', mode=mode,
                           num_classes=3, img_size=32, teacher_kwargs=arch, student_kwargs=arch)
    token = model.student.cls_token.detach().flatten()
    if mode is None:
        assert token.abs().max() < 1e-4  # timm's own
    else:  # truncated normal, std 0.02 (truncated at +-2 absolute, i.e. not at all at this scale)
        assert 0.017 < token.std().item() < 0.023 and token.abs().mean().item() > 0.01


# ---- evaluation crop: 1.0 for images that already have the input size / probe mode, MAE's 0.875 otherwise ----
def expected_eval_tensor(image: Image.Image, size: int, crop_pct: float) -> torch.Tensor:
    """Bicubic resize of the shorter side to int(size / crop_pct), centre crop, then ImageNet normalisation,
    written with PIL and numpy."""
    side = int(size / crop_pct)
    w, h = image.size
    new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    image = image.resize(new, Image.BICUBIC) if new != image.size else image
    left, top = int(round((image.size[0] - size) / 2.0)), int(round((image.size[1] - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize('image_size,probe,expected_pct', [(32, False, 1.0), (32, True, 1.0), (48, False, 0.875),
                                                           (48, True, 1.0)])
def test_eval_crop_default_and_transform(tmp_path, image_size, probe, expected_pct):
    data = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=1, val_per_class=2, size=image_size)
    assert get_mode('probe' if probe else 'none').default_eval_crop_pct(32, os.path.join(data, 'val')) == expected_pct
    dataset = build_dataset(False, SimpleNamespace(input_size=32, nb_classes=3, data_path=data,
                                                   eval_crop_pct=expected_pct))
    path, _ = dataset.samples[0]
    torch.testing.assert_close(dataset[0][0], expected_eval_tensor(Image.open(path).convert('RGB'), 32, expected_pct),
                               atol=1e-6, rtol=0)
    if image_size == 32:  # the image as it is: no resampling at all
        raw = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255.0)
        assert torch.allclose(dataset[0][0][0], (raw[..., 0] - 0.485) / 0.229, atol=1e-6)


def test_eval_crop_is_resolved_recorded_and_checked(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=2, val_per_class=1)
    args = main_finetune.get_args_parser().parse_args(tiny_args(data, str(tmp_path / 'out')))
    main_finetune.resolve_args(args)
    assert args.eval_crop_pct == 1.0  # 32x32 images at --input_size 32
    args = main_finetune.get_args_parser().parse_args(tiny_args(data, str(tmp_path / 'out'), '--eval_crop_pct', '0'))
    with pytest.raises(UserError, match='--eval_crop_pct'):
        main_finetune.resolve_args(args)
    assert 'eval_crop_pct' in main_finetune.MODEL_ARGS  # --eval --resume takes the checkpoint's


# ---- probe mode: budget in image presentations, step schedule, class-token models ------------------------
def test_probe_epochs_from_presentations():
    assert probe_epochs(650000) == 251  # the reference: int(320000 * 512 / 650000) - 1
    assert probe_epochs(400, 96000) == 239


def test_step_schedule():
    args = SimpleNamespace(lr=7.5e-4, min_lr=0.0, warmup_epochs=0, epochs=251, sched='step', step_epochs=[200],
                           step_rate=0.1)
    # 0-based epoch indices; the reference's loop counts from 1, so its 200th epoch (index 199) is stepped down
    for epoch, expected in ((0.0, 7.5e-4), (150.5, 7.5e-4), (198.99, 7.5e-4), (199.0, 7.5e-5), (250.9, 7.5e-5)):
        assert lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.sched, args.step_epochs,
                     args.step_rate) == pytest.approx(expected, rel=1e-12), epoch
    args.step_epochs = [100, 200]
    assert lr_at(210.0, 1.0, 0.0, 0, 251, 'step', [100, 200], 0.1) == pytest.approx(0.01)
    assert lr_at(98.5, 1.0, 0.0, 0, 251, 'step', [100, 200], 0.1) == pytest.approx(1.0)


def test_probe_defaults_class_token_and_step_schedule(tmp_path):
    parser = main_finetune.get_args_parser()
    argv = ['--mode', 'probe', '--eval_data_path', 'x']
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    get_mode(args.mode).apply_defaults(args)
    assert args.global_pool is False and args.sched == 'step' and args.step_epochs == [200, 300]
    argv += ['--global_pool', '--sched', 'cosine']
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    get_mode(args.mode).apply_defaults(args)
    assert args.global_pool is True and args.sched == 'cosine'


@pytest.mark.parametrize('pool,warns', [('avg', True), ('token', False)])
def test_selection_warns_when_the_teacher_pools_by_average(tmp_path, pool, warns):
    teacher = create_vit('vit_base_patch16_224', num_classes=3, global_pool=pool, img_size=32, **ARCH)
    path = str(tmp_path / 'teacher.pth')
    torch.save({'model': teacher.state_dict(), 'args': {'model': 'vit_base_patch16_224', 'model_kwargs': ARCH,
                                                        'nb_classes': 3, 'input_size': 32,
                                                        'global_pool': pool == 'avg'}}, path)
    args = select_wild_data.get_args_parser().parse_args(['--teacher', path, '--wild_path', 'w', '--output', 'o'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        select_wild_data.build_teacher(args)
    assert any('--cls_token' in str(w.message) for w in caught) == warns


# ---- checkpoints of the attention transfer reference (the whole dual model) -------------------------------
def reference_checkpoint(path: str, mode: str) -> DualViT:
    """A checkpoint in the reference's layout: model = teacher.* and student.* of the dual model,
    model_ema = the EMA of the dual model (ModelEmaV2: module.*), args = a Namespace whose end_layer
    the released code ignored (its model transfers depth - 3 layers)."""
    torch.manual_seed(1)
    dual = build_dual_vit('vit_base_patch16_224', mode=mode, num_classes=3, img_size=32, end_layer=-3,
                          teacher_kwargs=ARCH)
    ema = copy.deepcopy(dual)
    with torch.no_grad():
        for p in ema.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {**{f'teacher.{k}': v for k, v in dual.teacher.state_dict().items()},
             **{f'student.{k}': v for k, v in dual.student.state_dict().items()}}
    ema_state = {f'module.teacher.{k}': v for k, v in ema.teacher.state_dict().items()}
    ema_state.update({f'module.student.{k}': v for k, v in ema.student.state_dict().items()})
    args = argparse.Namespace(model='vit_base_patch16_224', mode=mode, nb_classes=3, input_size=32, global_pool=True,
                              end_layer=-1, drop_path=0.1, model_kwargs=ARCH)
    torch.save({'model': state, 'model_ema': ema_state, 'optimizer': {'state': {}, 'param_groups': []},
                'epoch': 99, 'scaler': {}, 'args': args}, path)
    dual.ema_student = ema.student
    return dual


def expected_eval(model, data: str) -> tuple[float, float]:
    """Mean cross-entropy and top-1 of ``model`` on data/val, images as they are (32x32 at input 32)."""
    dataset = build_dataset(False, SimpleNamespace(input_size=32, nb_classes=3, data_path=data, eval_crop_pct=1.0))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).float().mean().item()


def test_reference_checkpoints_evaluate_finetune_ensemble_and_export(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=1, val_per_class=6)
    copy_path, distill_path = str(tmp_path / 'copy.pth'), str(tmp_path / 'distill.pth')
    copy_model, distill_model = reference_checkpoint(copy_path, 'copy'), reference_checkpoint(distill_path, 'distill')
    common = ['--data_path', data, '--device', 'cpu', '--num_workers', '0', '--model_kwargs', *TINY_KWARGS]

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
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **ARCH)
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


# ---- class weights from an augmented pass over the selection (the reference) ---------------------------
def test_class_weights_from_an_augmented_pass(tmp_path):
    classes = 3
    teacher_path = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), classes=classes)
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': ARCH, 'nb_classes': classes, 'input_size': 32,
                    'global_pool': True, 'mode': None}
    torch.save(ckpt, teacher_path)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=classes, train_per_class=6, val_per_class=0, size=40)
    selection_path = str(tmp_path / 'selection.pth')
    select_args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', selection_path, '--num_select', '12',
         '--batch_size', '5', '--num_workers', '0', '--device', 'cpu'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        selection = select_wild_data.main(select_args)
        teacher = select_wild_data.build_teacher(select_args)
    weights = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 7, 5, 'cpu')

    # independent: torch seeded with 7, each selected image in order through resize 32x32, pad-4 random crop,
    # flip with probability 0.5, ImageNet normalisation; the teacher's softmax summed; inverse, sum = classes
    augment = transforms.Compose([transforms.Resize((32, 32)), transforms.RandomCrop(32, padding=4),
                                  transforms.RandomHorizontalFlip(0.5), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    torch.manual_seed(7)
    images = [augment(Image.open(os.path.join(selection['root'], selection['paths'][i])).convert('RGB'))
              for i in selection['selected'].tolist()]
    with torch.no_grad():
        sums = teacher(torch.stack(images)).softmax(dim=1).double().sum(dim=0)
    expected = (1.0 / sums) / (1.0 / sums).sum() * classes
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights, selection['class_weights'], rtol=1e-3)  # not the unaugmented pass's

    # cached beside the selection, reused while nothing changed; another seed recomputes
    cache = selection_path + '.aug_weights.pth'
    assert os.path.exists(cache)
    torch.save({**torch.load(cache), 'class_weights': torch.full((classes,), 5.0)}, cache)
    reused = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 7, 5, 'cpu')
    assert torch.equal(reused, torch.full((classes,), 5.0))
    other = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 8, 5, 'cpu')
    assert not torch.equal(other, reused) and other.sum().item() == pytest.approx(classes)


# ---- --pos_num: labelled originals of the target's training split mixed into the selection ----------------
def test_pos_num_mixes_originals_per_class(tmp_path):
    target = make_image_folder(str(tmp_path / 'target'), classes=3, train_per_class=5, val_per_class=1)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=2, train_per_class=4, val_per_class=0)
    paths = sorted(os.path.relpath(os.path.join(d, f), wild) for d, _, fs in os.walk(wild) for f in fs)
    selection = str(tmp_path / 'selection.pth')
    torch.save({'root': wild, 'paths': paths, 'selected': torch.tensor([0, 2, 5]), 'nb_classes': 3,
                'ranking': 'output'}, selection)
    args = SimpleNamespace(mode='probe', selection=selection, nb_classes=3, input_size=32, hflip=0.5, seed=0,
                           eval_data_path=target, pos_num=2)
    dataset = get_mode('probe').train_dataset(args)
    assert dataset.paths[:3] == [paths[0], paths[2], paths[5]] and len(dataset) == 3 + 2 * 3
    originals = dataset.paths[3:]
    per_class = {c: sum(os.path.dirname(p) == os.path.join(target, 'train', c) for p in originals)
                 for c in ('class_0', 'class_1', 'class_2')}
    assert per_class == {'class_0': 2, 'class_1': 2, 'class_2': 2} and len(set(originals)) == 6
    image, index = dataset[4]
    assert image.shape == (3, 32, 32) and index == 4
    assert get_mode('probe').train_dataset(args).paths == dataset.paths  # seeded
    args.pos_num = 6
    with pytest.raises(UserError, match='--pos_num'):
        get_mode('probe').train_dataset(args)


# ---- DFND_DeiT-train.py: the reference's command mapped onto the two scripts -----------------------------
def load_dfnd():
    spec = importlib.util.spec_from_file_location('dfnd_deit_train', os.path.join(ROOT, 'DFND_DeiT-train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dfnd_command_runs_end_to_end(tmp_path):
    """The reference's command on a tiny teacher (4x4 patches, the student's token grid) and generated data."""
    teacher_path = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), classes=3, patch_size=4)
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': {**ARCH, 'patch_size': 4}, 'nb_classes': 3,
                    'input_size': 32, 'global_pool': True, 'mode': None}
    torch.save(ckpt, teacher_path)
    target = make_image_folder(str(tmp_path / 'cifar'), classes=3, train_per_class=2, val_per_class=2)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=3, train_per_class=6, val_per_class=0, seed=3)
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
