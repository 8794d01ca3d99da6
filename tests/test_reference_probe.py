"""Fidelity to the Attention Probe reference (IIGROUP/AttentionProbe): the optimizer's weight decay, the probe
student's class token, its ImageNet script's --pos_num recipe and budget, and DFND_DeiT-train.py taking the
reference's command lines unchanged. Expected values are written out here by hand or computed independently."""
import argparse
import importlib.util
import os
import re
import string
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import DATA_DEFAULTS, ROOT, make_image_folder, pair_of
from PIL import Image
from torchvision import transforms

import main_finetune
import select_wild_data
from models_dual_vit import build_dual_vit
from models_vit import create_vit
from modes import get_mode
from util.args import explicit_flags
from util.config import Config
from util.errors import UserError
from util.pretrained import load_pretrained_weights
from util.run_control import Preempted
from util.selection import labelled_originals, probe_training_set, training_class_weights

# ---- weight decay: every parameter in probe mode (the reference's AdamW(net.parameters(), weight_decay=0.025)),
# MAE/DeiT's exemptions in the other modes. The reference's CIFAR student, 12 blocks: its 152 tensors by name.
CIFAR_STUDENT = dict(patch_size=4, embed_dim=128, num_heads=2)
BLOCK_MATRICES = ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight')
BLOCK_VECTORS = ('norm1.weight', 'norm1.bias', 'attn.qkv.bias', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
                 'mlp.fc1.bias', 'mlp.fc2.bias')
ALL_TENSORS = ({'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight',
                'norm.bias', 'head.weight', 'head.bias'}
               | {f'blocks.{i}.{n}' for i in range(12) for n in BLOCK_MATRICES + BLOCK_VECTORS})
MAE_EXEMPT = ({'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias', 'head.bias'}
              | {f'blocks.{i}.{n}' for i in range(12) for n in BLOCK_VECTORS})


def cifar_pair(mode: str):
    if mode == 'probe':
        return pair_of('probe', '--model', 'vit_tiny_patch16_224', '--cls_token', classes=10,
                       arch=CIFAR_STUDENT)
    return build_dual_vit('vit_tiny_patch16_224', mode=mode, num_classes=10, img_size=32, global_pool=False,
                          teacher_kwargs=CIFAR_STUDENT)


@pytest.mark.parametrize('mode', ['probe', 'distill'])
def test_weight_decay_groups_and_one_optimizer_step(mode):
    assert len(ALL_TENSORS) == 152 and len(MAE_EXEMPT) == 102
    model = cifar_pair(mode)
    args = SimpleNamespace(weight_decay=0.025, layer_decay=1.0)
    groups = main_finetune.param_groups(model, get_mode(mode), args.weight_decay, args.layer_decay)
    decay = {name: g['weight_decay'] for g in groups for name in g['names']}
    expected = {n: 0.0 if mode != 'probe' and n in MAE_EXEMPT else 0.025 for n in ALL_TENSORS}
    assert decay == expected
    assert {g['lr_scale'] for g in groups} == {1.0}

    # the optimizer as main_finetune builds it: with zero gradients AdamW's step is its decoupled decay alone,
    # p <- p * (1 - lr * weight_decay), on exactly the decayed tensors
    optimizer = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.999))
    before = {n: p.detach().clone().double() for n, p in model.student.named_parameters()}
    for p in model.student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.student.named_parameters():
        factor = 1.0 - 0.1 * expected[name]
        torch.testing.assert_close(p.detach().double(), before[name] * factor, rtol=1e-6, atol=0, msg=name)


# ---- the probe student's class token: truncated normal, std 0.02 (the reference's timm), not timm's 1e-6 today ----
def test_probe_student_class_token_initialisation():
    torch.manual_seed(0)
    token = pair_of('probe', '--cls_token', classes=3, arch=dict(depth=3)).student.cls_token.detach().flatten()  # 768
    assert 0.018 < token.std().item() < 0.022 and abs(token.mean().item()) < 0.003


# ---- --pos_num as the reference's DFND_DeiT-imagenet.py: the first N per class, aspect ratio kept -------------
def save_image(path: str, pixels: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3))


def write_selection(path: str, root: str, paths: list, selected: list) -> str:
    torch.save({'root': root, 'paths': paths, 'selected': torch.tensor(selected), 'nb_classes': 2,
                'ranking': 'output'}, path)
    return path


def test_pos_num_takes_the_first_images_of_each_class_in_imagefolder_order(tmp_path):
    rng = np.random.default_rng(0)
    train = str(tmp_path / 'target' / 'train')
    for cls, names in (('cat', ['b.png', 'a.png', '10.png', '9.png']), ('dog', ['2.png', 'x.jpg', '1.png'])):
        for name in names:
            save_image(os.path.join(train, cls, name), noise(rng, 8, 8))
    (tmp_path / 'target' / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    # sorted names: cat 10.png 9.png a.png b.png, dog 1.png 2.png x.jpg
    expected = [os.path.join(train, 'cat', '10.png'), os.path.join(train, 'cat', '9.png'),
                os.path.join(train, 'dog', '1.png'), os.path.join(train, 'dog', '2.png')]
    assert labelled_originals(train, 2) == expected
    assert labelled_originals(train, 3)[-3:] == [os.path.join(train, 'dog', n) for n in ('1.png', '2.png', 'x.jpg')]
    with pytest.raises(UserError, match="--pos_num 4: class folder .*dog' holds only 3 images"):
        labelled_originals(train, 4)

    # probe mode's training set: the selection in its order, then the originals
    wild = str(tmp_path / 'wild')
    paths = [f'w{i}.png' for i in range(5)]
    for p in paths:
        save_image(os.path.join(wild, p), noise(rng, 8, 8))
    args = SimpleNamespace(**DATA_DEFAULTS,
                           selection=write_selection(str(tmp_path / 'sel.pth'), wild, paths, [4, 0, 2]),
                           nb_classes=2, input_size=8, eval_data_path=str(tmp_path / 'target'), pos_num=2)
    dataset = get_mode('probe').train_dataset(args)
    assert dataset.paths == ['w4.png', 'w0.png', 'w2.png'] + expected and dataset.num_selected == 3


def horizontal_and_vertical_steps(image: torch.Tensor) -> tuple[float, float]:
    """Median grey-level step between neighbouring pixels of the image (padding, which is 0, left out): along x
    in the red channel, along y in the green one."""
    red, green = image[0] * 255, image[1] * 255
    dx = (red[:, 1:] - red[:, :-1]).abs()[(red[:, 1:] > 0) & (red[:, :-1] > 0)]
    dy = (green[1:] - green[:-1]).abs()[(green[1:] > 0) & (green[:-1] > 0)]
    return dx.median().item(), dy.median().item()


def test_originals_keep_their_aspect_ratio_wild_images_are_squashed(tmp_path):
    # 64 x 32 ramps: red rises 4 grey levels per column, green 7 per row; at input 16 an original is resized to
    # 32 x 16 (steps 8 and 14), a wild image to 16 x 16 (steps 16 and 14)
    x, y = np.meshgrid(np.arange(64), np.arange(32))
    ramp = np.stack([3 + 4 * x, 3 + 7 * y, np.full_like(x, 128)], axis=-1)
    wild = str(tmp_path / 'wild')
    save_image(os.path.join(wild, 'w.png'), ramp)
    original = save_image(str(tmp_path / 'target' / 'train' / 'c' / 'o.png'), ramp)
    selection = {'root': wild, 'paths': ['w.png'], 'selected': torch.tensor([0])}
    dataset = probe_training_set(selection, [original], 16, 0.5, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(3):  # any crop and flip
        assert horizontal_and_vertical_steps(dataset[0][0]) == pytest.approx((16, 14), abs=1)
        assert horizontal_and_vertical_steps(dataset[1][0]) == pytest.approx((8, 14), abs=1)


def test_budget_is_divided_by_the_selected_images_alone(tmp_path):
    mode = get_mode('probe')
    # int(presentations / selected) - 1, written out: 640000 x 512 / 1,000,000 = 327.68 (the ImageNet script),
    # / 800,000 = 409.6 (its Tiny-ImageNet line); 320000 x 512 / 650,000 = 252.06 (CIFAR)
    for presentations, selected, epochs in ((640000 * 512, 1000000, 326), (640000 * 512, 800000, 408),
                                            (320000 * 512, 650000, 251)):
        args = SimpleNamespace(presentations=presentations, explicit_flags=['lr'], epochs=50)
        assert mode.epochs(SimpleNamespace(num_selected=selected), args.epochs, args.explicit_flags,
                           args.presentations) == epochs
    # a training set of 2 selected + 4 originals: 96 presentations / 2 - 1 = 47 (not 96 / 6 - 1 = 15)
    rng = np.random.default_rng(1)
    wild, target = str(tmp_path / 'wild'), str(tmp_path / 'target')
    for p in ('a.png', 'b.png'):
        save_image(os.path.join(wild, p), noise(rng, 8, 8))
    for c in ('c0', 'c1'):
        for i in range(2):
            save_image(os.path.join(target, 'train', c, f'{i}.png'), noise(rng, 8, 8))
    args = SimpleNamespace(**DATA_DEFAULTS,
                           selection=write_selection(str(tmp_path / 'sel.pth'), wild, ['a.png', 'b.png'], [0, 1]),
                           nb_classes=2, input_size=8, eval_data_path=target, pos_num=2,
                           presentations=96, explicit_flags=['lr'], epochs=50)
    dataset = mode.train_dataset(args)
    assert len(dataset) == 6 and mode.epochs(dataset, args.epochs, args.explicit_flags, args.presentations) == 47
    args.explicit_flags = ['epochs']
    assert mode.epochs(dataset, args.epochs, args.explicit_flags, args.presentations) == 50


def test_class_weights_count_the_originals(tmp_path):
    """The reference's ImageNet script sums the teacher's soft predictions over its whole training loader,
    originals included, each image through its training transform."""
    rng = np.random.default_rng(2)
    wild, target = str(tmp_path / 'wild'), str(tmp_path / 'target')
    paths = [f'w{i}.png' for i in range(4)]
    for p in paths:
        save_image(os.path.join(wild, p), noise(rng, 40, 40))
    for c in range(3):
        for i in range(2):
            save_image(os.path.join(target, 'train', f'c{c}', f'{i}.png'), noise(rng, 32, 48))  # 48 wide
    selection = write_selection(str(tmp_path / 'sel.pth'), wild, paths, [3, 1, 0])
    teacher_path = str(tmp_path / 'teacher.pth')
    torch.manual_seed(5)
    teacher = create_vit('vit_base_patch16_224', num_classes=3, global_pool='token', img_size=32, patch_size=8,
                         embed_dim=48, depth=2, num_heads=3).eval()
    torch.save({'model': teacher.state_dict()}, teacher_path)
    originals = [os.path.join(target, 'train', f'c{c}', f'{i}.png') for c in range(3) for i in (0, 1)]
    weights = training_class_weights(teacher, selection, teacher_path, 32, 0.5, 7, 4, 'cpu', originals=originals)

    # independent: torch seeded with 7, the selected images then the originals in order, each through its own
    # torchvision pipeline (wild: squashed to 32 x 32; originals: shorter side to 32), ImageNet normalisation
    normalise = [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(0.5)]
    squash = transforms.Compose([transforms.Resize((32, 32))] + augment + normalise)
    keep = transforms.Compose([transforms.Resize(32)] + augment + normalise)
    torch.manual_seed(7)
    images = [squash(Image.open(os.path.join(wild, paths[i])).convert('RGB')) for i in (3, 1, 0)]
    images += [keep(Image.open(p).convert('RGB')) for p in originals]
    with torch.no_grad():
        sums = teacher(torch.stack(images)).softmax(dim=1).double().sum(dim=0)
    expected = (1.0 / sums) / (1.0 / sums).sum() * 3
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    without = training_class_weights(teacher, selection, teacher_path, 32, 0.5, 7, 4, 'cpu')
    assert not torch.allclose(without, weights, rtol=1e-3)  # the originals count

    # probe mode with --robust --pos_num 2 asks for exactly these
    args = SimpleNamespace(**DATA_DEFAULTS, class_weights='augmented', selection=selection, finetune=teacher_path,
                           input_size=32,
                           seed=7, batch_size=4, device='cpu', pos_num=2, eval_data_path=target)
    assert torch.equal(get_mode('probe').class_weights(args, SimpleNamespace(teacher=teacher), None), weights)


# ---- DFND_DeiT-train.py: the reference's command lines, as its README and scripts write them -------------------
def load_dfnd():
    spec = importlib.util.spec_from_file_location('dfnd_deit_train', os.path.join(ROOT, 'DFND_DeiT-train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The lines of the reference's training.sh / README (CIFAR-10, CIFAR-100), training_tinyimagenet.sh and
# training_imagenet.sh after the script name, with their variables; the scripts' folders end in '/'.
REFERENCE_LINES = {
    'cifar10': '--dataset cifar10 --data_cifar $root_cifar10 --data_imagenet $root_wild --num_select 650000 '
               '--teacher_dir $teacher_cifar10 --selected_file $selected_cifar10 --output_dir $output_student_cifar10 '
               '--nb_classes 10 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist',
    'cifar100': '--dataset cifar100 --data_cifar $root_cifar100 --data_imagenet $root_wild --num_select 650000 '
                '--teacher_dir $teacher_cifar100 --selected_file $selected_cifar100 '
                '--output_dir $output_student_cifar100 --nb_classes 100 --lr_S 8.5e-4 --attnprobe_sel --attnprobe_dist',
    'tinyimagenet': '--dataset tinyimagenet --data_cifar $root_tinyimagenet --data_imagenet $root_wild '
                    '--num_select 800000 --teacher deit_small_patch16_224 --teacher_dir $teacher_tinyimagenet '
                    '--selected_file $selected_tinyimagenet --output_dir $output_student_tinyimagenet '
                    '--nb_classes 200 --pos_num 50 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist',
    'imagenet': '--dataset imagenet --data_cifar $root_imagenet --data_imagenet $root_wild --num_select 1000000 '
                '--teacher deit_base_patch16_224 --teacher_dir $teacher_imagenet --selected_file $selected_imagenet '
                '--output_dir $output_student_imagenet --nb_classes 1000 --pos_num 129 --lr_S 7.5e-4 '
                '--attnprobe_sel --attnprobe_dist',
}


def reference_layout(tmp_path, dataset: str) -> dict:
    """The scripts' folders under tmp_path: the target task (train/, val/), the wild set, a teacher file in the
    reference's format (a state dict under 'model', no architecture recorded; not read by these tests' stubs)."""
    root = str(tmp_path)
    target = make_image_folder(os.path.join(root, 'database', dataset), classes=2, val_per_class=1, size=8,
                               train_per_class={'imagenet': 129, 'tinyimagenet': 50}.get(dataset, 1))  # --pos_num
    os.makedirs(os.path.join(root, 'database', 'wild'))
    teacher = os.path.join(root, 'output', dataset, 'teacher', 'checkpoint.pth')
    os.makedirs(os.path.dirname(teacher))
    torch.save({'model': {}, 'args': argparse.Namespace(model='deit')}, teacher)
    return {f'root_{dataset}': target + '/', 'root_wild': os.path.join(root, 'database', 'wild') + '/',
            f'teacher_{dataset}': teacher, f'selected_{dataset}': os.path.join(root, 'selected', dataset) + '/',
            f'output_student_{dataset}': os.path.join(root, 'output', dataset) + '/'}


def expected_lists(dataset: str, v: dict) -> tuple[list, list]:
    """What each step receives, written out per variant."""
    s = {'cifar10': ('10', '7.5e-4', '0.9665'), 'cifar100': ('100', '8.5e-4', '0.763'),
         'tinyimagenet': ('200', '7.5e-4', '0.8118'), 'imagenet': ('1000', '7.5e-4', '0.8118')}[dataset]
    classes, lr, acc = s
    teacher, selection = v[f'teacher_{dataset}'], v[f'selected_{dataset}'] + 'selection.pth'
    num_select = {'cifar10': '650000', 'cifar100': '650000', 'tinyimagenet': '800000', 'imagenet': '1000000'}[dataset]
    select = ['--teacher', teacher, '--wild_path', v['root_wild'], '--num_select', num_select, '--output', selection,
              '--nb_classes', classes, '--score', 'output', '--attnlier', '0.05', '--outlier', '0.9']
    student_dir = v[f'output_student_{dataset}'] + 'student'
    train = ['--mode', 'probe', '--finetune', teacher, '--selection', selection, '--eval_data_path',
             v[f'root_{dataset}'], '--nb_classes', classes, '--lr', str(float(lr)), '--output_dir', student_dir,
             '--log_dir', student_dir, '--teacher_acc', acc, '--patchattn', '0.8', '--sched', 'step', '--save_best']
    if dataset.startswith('cifar'):  # the reference's default teacher, deit_base_patch4_32_teacher
        select += ['--model', 'vit_small_patch16_224', '--model_kwargs', 'patch_size=4', 'num_heads=3',
                   '--input_size', '32', '--cls_token']
        train += ['--input_size', '32', '--student_model', 'vit_tiny_patch16_224', '--student_kwargs', 'patch_size=4',
                  'embed_dim=128', 'num_heads=2', '--teacher_model', 'vit_small_patch16_224', '--model_kwargs',
                  'patch_size=4', 'num_heads=3']
    else:
        arch = {'tinyimagenet': 'deit_small_patch16_224', 'imagenet': 'deit_base_patch16_224'}[dataset]
        select += ['--model', arch, '--input_size', '224', '--cls_token']
        train += ['--input_size', '224', '--student_model', 'vit_tiny_patch16_224', '--teacher_model', arch,
                  '--presentations', '327680000', '--pos_num', {'tinyimagenet': '50', 'imagenet': '129'}[dataset]]
    return select, train


@pytest.fixture
def stubbed_steps(monkeypatch):
    """select_wild_data.main and main_finetune.run replaced by recorders: nothing is scored or trained."""
    calls = []
    monkeypatch.setattr(select_wild_data, 'main', lambda args: calls.append(('select', args)))
    monkeypatch.setattr(main_finetune, 'run', lambda argv: calls.append(('train', argv)) or {})
    return calls


@pytest.mark.parametrize('dataset', list(REFERENCE_LINES))
def test_reference_command_lines_reach_both_steps(tmp_path, stubbed_steps, dataset):
    v = reference_layout(tmp_path, dataset)
    argv = string.Template(REFERENCE_LINES[dataset]).substitute(v).split()
    dfnd = load_dfnd()
    select, train = expected_lists(dataset, v)
    assert dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv)) == (select, train)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dfnd.main(argv)
    assert [c[0] for c in stubbed_steps] == ['select', 'train']
    assert vars(stubbed_steps[0][1]) == vars(select_wild_data.get_args_parser().parse_args(select))
    assert stubbed_steps[1][1] == train


def run_variant(tmp_path, extra: list, dataset: str = 'cifar10') -> tuple[list, list]:
    v = reference_layout(tmp_path, dataset)
    argv = string.Template(REFERENCE_LINES[dataset]).substitute(v).split() + extra
    dfnd = load_dfnd()
    return dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv))


def test_flag_variants(tmp_path):
    base_select, base_train = expected_lists('cifar10', reference_layout(tmp_path / 'expected', 'cifar10'))
    select, train = run_variant(tmp_path / 'a', ['--schedule', '100', '150', '--epochs', '3', '--batch_size', '64'])
    assert train[len(base_train):] == ['--step_epochs', '100', '150', '--epochs', '3', '--batch_size', '64']
    select, train = run_variant(tmp_path / 'b', ['--schedule'])
    assert train[len(base_train):] == ['--step_rate', '1']  # no milestones: a constant lr
    # main_finetune.py's flags reach it as written, also those that begin like one of the reference's
    # (--sched, --schedule): no abbreviations
    select, train = run_variant(tmp_path / 'e', ['--sched', 'cosine'])
    assert train[len(base_train):] == ['--sched', 'cosine'] and len(select) == len(base_select)
    select, train = run_variant(tmp_path / 'c', ['--robust', '--random', '--cos', '--attnlier', '0.1', '--outlier',
                                                 '0.5', '--patchattn', '0.3', '--device', 'cpu', '--num_workers', '0'])
    assert select[select.index('--attnlier') + 1:select.index('--attnlier') + 4] == ['0.1', '--outlier', '0.5']
    assert select[-5:] == ['--random', '--device', 'cpu', '--num_workers', '0']
    assert train[train.index('--sched') + 1] == 'cosine' and train[train.index('--patchattn') + 1] == '0.3'
    assert train[-5:] == ['--robust', '--device', 'cpu', '--num_workers', '0']
    # without --attnprobe_sel / --attnprobe_dist: the combined ranking, no patch probe loss
    v = reference_layout(tmp_path / 'd', 'cifar10')
    argv = string.Template(REFERENCE_LINES['cifar10']).substitute(v).replace('--attnprobe_sel --attnprobe_dist', '')
    dfnd = load_dfnd()
    select, train = dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv.split()))
    assert select[select.index('--score') + 1] == 'combined' and train[train.index('--patchattn') + 1] == '0.0'


def test_defaults_output_folder_and_teacher_of_this_project(tmp_path):
    v = reference_layout(tmp_path, 'cifar10')
    argv = string.Template(REFERENCE_LINES['cifar10']).substitute(v).split()
    argv = argv[:argv.index('--num_select')] + argv[argv.index('--num_select') + 2:]
    out = argv.index('--output_dir') + 1
    argv[out] = argv[out].rstrip('/')  # .../output/cifar10 -> .../output/cifar10student, as the reference
    dfnd = load_dfnd()
    select, train = dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv))
    assert select[select.index('--num_select') + 1] == '600000'  # the reference's default
    assert train[train.index('--output_dir') + 1] == os.path.join(str(tmp_path), 'output', 'cifar10student')
    # a teacher of this project records its architecture: no teacher flags
    teacher = v['teacher_cifar10']
    torch.save({'model': {}, 'args': {'model': 'vit_small_patch16_224', 'model_kwargs': {'patch_size': 4},
                                      'nb_classes': 10, 'input_size': 32, 'global_pool': False}}, teacher)
    select, train = dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv))
    assert '--model' not in select and '--teacher_model' not in train and '--model_kwargs' not in train


@pytest.mark.parametrize('extra,dataset,message', [
    (['--bach_size', '64'], 'cifar10', 'unrecognised arguments: --bach_size 64'),
    (['--eval_crop_pct', '0'], 'cifar10', '--eval_crop_pct'),
    (['--teacher', 'deit_base_patch16_224'], 'cifar10', 'token grids'),  # a 224 px teacher at the CIFAR size
    (['--teacher', 'no_such_vit'], 'cifar10', "unknown model 'no_such_vit'"),
])
def test_every_flag_is_checked_before_the_selection(tmp_path, stubbed_steps, extra, dataset, message):
    v = reference_layout(tmp_path, dataset)
    argv = string.Template(REFERENCE_LINES[dataset]).substitute(v).split() + extra
    with pytest.raises(UserError, match=message):
        load_dfnd().main(argv)
    assert stubbed_steps == []


def test_checks_the_target_layout_before_the_selection(tmp_path, stubbed_steps):
    v = reference_layout(tmp_path, 'imagenet')
    os.rename(os.path.join(v['root_imagenet'], 'train'), os.path.join(v['root_imagenet'], 'elsewhere'))
    argv = string.Template(REFERENCE_LINES['imagenet']).substitute(v).split()
    with pytest.raises(UserError, match='--data_cifar .* has no train/ folder'):
        load_dfnd().main(argv)
    assert stubbed_steps == []


def test_a_teacher_in_the_reference_format_loads_in_both_steps(tmp_path):
    """A teacher saved as the reference's scripts save it (timm's key layout under 'model', DeiT's arguments as a
    Namespace), built as --teacher deit_tiny_patch4_32_teacher names it: both steps compute its own logits."""
    torch.manual_seed(3)
    reference = create_vit('vit_tiny_patch16_224', num_classes=3, global_pool='token', img_size=32, patch_size=4,
                           embed_dim=128, num_heads=2).eval()
    v = reference_layout(tmp_path, 'cifar10')
    torch.save({'model': reference.state_dict(), 'epoch': 299,
                'args': argparse.Namespace(model='deit_tiny_patch4_32_teacher', nb_classes=3)}, v['teacher_cifar10'])
    argv = (string.Template(REFERENCE_LINES['cifar10']).substitute(v).replace('--nb_classes 10', '--nb_classes 3')
            .split() + ['--teacher', 'deit_tiny_patch4_32_teacher', '--device', 'cpu'])
    dfnd = load_dfnd()
    select, train = dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        selection_teacher = select_wild_data.build_teacher(
            *select_wild_data.resolve(select_wild_data.get_args_parser().parse_args(select)))
        torch.testing.assert_close(selection_teacher(x), expected)
        parser = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()])
        args = parser.parse_args(train)
        args = Config.of(args, explicit_flags=explicit_flags(parser, train), selection_pending=True)
        run = main_finetune.resolve_args(args)
        model = main_finetune.build_model(run)
        load_pretrained_weights(model.teacher, run.cfg.finetune)
        torch.testing.assert_close(model.teacher(x), expected)


# ---- moved from test_bad_input.py: DFND_DeiT-train.py refuses what the task cannot give ----------------------------
@pytest.mark.parametrize('extra, expected', [
    (['--lr_S', '-1'], r"--lr_S -1: the student's learning rate must be > 0"),
    (['--nb_classes', '0'], r"--nb_classes 0: must be >= 1"),
    (['--dataset', 'imagenet'], r"--pos_num 129: class folder .* holds only 1 images; lower --pos_num"),  # its default
    (['--pos_num', '3'], r"--pos_num 3: class folder .* holds only 1 images; lower --pos_num"),
])
def test_dfnd_refuses_what_the_task_cannot_give_before_scoring(tmp_path, monkeypatch, capsys, extra, expected):
    import string

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


# ---- moved from test_run_folder.py: DFND_DeiT-train.py, a rerun after a stop and the stop itself -------------------
def test_dfnd_rerun_into_a_stopped_students_folder_is_refused_before_the_selection(tmp_path, monkeypatch):
    import string

    v = reference_layout(tmp_path, 'cifar10')
    student = v['output_student_cifar10'] + 'student'
    os.makedirs(student)
    for name in ('checkpoint.pth', 'log.txt'):
        open(os.path.join(student, name), 'w').write('a stopped run')
    monkeypatch.setattr(select_wild_data, 'main', lambda args: pytest.fail('selection started'))
    argv = string.Template(REFERENCE_LINES['cifar10']).substitute(v).split()
    with pytest.raises(UserError, match=r"--output_dir .*student' holds a run .*--resume allow"):
        load_dfnd().main(argv)
    dfnd = load_dfnd()
    _, train = dfnd.translate(*dfnd.get_args_parser().parse_known_args(argv + ['--resume', 'allow']))
    assert train[-2:] == ['--resume', 'allow']  # continued by main_finetune.py


def test_dfnd_reports_a_stop_in_one_line_with_the_signals_status(tmp_path, monkeypatch, capsys):
    import signal
    import string

    def stopped(argv):
        with mock.patch('util.run_control.stop_signal', return_value=signal.SIGTERM):
            raise Preempted(3, 40, True)

    def exit_now(code):
        raise SystemExit(code)

    v = reference_layout(tmp_path, 'cifar10')
    monkeypatch.setattr(select_wild_data, 'main', lambda args: None)
    monkeypatch.setattr(main_finetune, 'run', stopped)
    monkeypatch.setattr(os, '_exit', exit_now)
    with pytest.raises(SystemExit) as end:
        load_dfnd().main(string.Template(REFERENCE_LINES['cifar10']).substitute(v).split())
    assert end.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == ('stopped: checkpoint written at epoch 3, step 40; continue with '
                                               '--resume allow')
