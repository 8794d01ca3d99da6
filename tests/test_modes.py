"""What each mode builds: the lr-decay layers of transfer and plain modes, probe mode's defaults, epochs and
training set, and the seed's full-size commands (they parse, build and take a step)."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_ARCH, make_image_folder, make_teacher_checkpoint, read_log

import main_finetune
from models_dual_vit import build_dual_vit
from modes import get_mode, probe_epochs
from util.args import explicit_flags
from util.config import Config
from util.errors import UserError
from util.pretrained import read_checkpoint

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
                           num_classes=3, img_size=32, teacher_kwargs=TINY_ARCH, student_kwargs=TINY_ARCH)
    args = SimpleNamespace(mode=mode, weight_decay=0.05, layer_decay=decay)
    groups = main_finetune.param_groups(model, get_mode(mode), args.weight_decay, args.layer_decay)
    scale = {name: g['lr_scale'] for g in groups for name in g['names']}
    assert set(scale) == {n for n, _ in model.student.named_parameters()}
    for name, value in scale.items():
        prefix = next(p for p in table if name.startswith(p))
        assert value == pytest.approx(decay ** table[prefix], rel=1e-12), name


# ---- probe mode: budget in image presentations, step schedule, class-token models ------------------------
def test_probe_epochs_from_presentations():
    assert probe_epochs(650000) == 251  # the reference: int(320000 * 512 / 650000) - 1
    assert probe_epochs(400, 96000) == 239


def test_probe_defaults_class_token_and_step_schedule(tmp_path):
    parser = main_finetune.get_args_parser()
    argv = ['--mode', 'probe', '--eval_data_path', 'x']
    args = parser.parse_args(argv)
    args = Config.of(args, explicit_flags=explicit_flags(parser, argv))
    args = args.replace(**get_mode(args.mode).recipe(args.explicit_flags))
    assert args.global_pool is False and args.sched == 'step' and args.step_epochs == [200, 300]
    argv += ['--global_pool', '--sched', 'cosine']
    args = parser.parse_args(argv)
    args = Config.of(args, explicit_flags=explicit_flags(parser, argv))
    args = args.replace(**get_mode(args.mode).recipe(args.explicit_flags))
    assert args.global_pool is True and args.sched == 'cosine'


# ---- --pos_num: labelled originals of the target's training split mixed into the selection ----------------
def test_pos_num_mixes_originals_per_class(shared_images, tmp_path):
    target = shared_images(classes=3, train_per_class=5, val_per_class=1)
    wild = shared_images(classes=2, train_per_class=4, val_per_class=0)
    paths = sorted(os.path.relpath(os.path.join(d, f), wild) for d, _, fs in os.walk(wild) for f in fs)
    selection = str(tmp_path / 'selection.pth')
    torch.save({'root': wild, 'paths': paths, 'selected': torch.tensor([0, 2, 5]), 'nb_classes': 3,
                'ranking': 'output'}, selection)
    args = SimpleNamespace(mode='probe', selection=selection, nb_classes=3, input_size=32, hflip=0.5, seed=0,
                           eval_data_path=target, pos_num=2, mean=(0.5,) * 3, std=(0.5,) * 3)
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


# ---- the seed's commands ----------------------------------------------------------------------------------
SEED_DISTILL = """--batch_size 32 --model dual_vit_large_patch16 --mode distill --end_layer -6 --atd_weight 3.0
    --finetune {ckpt} --resume allow --epochs 200 --ema 0.9999 --blr 1e-4 --layer_decay 1 --beta2 0.95
    --warmup_epochs 20 --weight_decay 0.3 --drop_path 0.2 --reprob 0.25 --mixup 0.8 --cutmix 1.0
    --dist_eval --data_path {data}"""
SEED_COPY = """--batch_size 32 --model dual_vit_large_patch16 --mode copy --finetune {ckpt} --resume allow
    --epochs 100 --ema 0.9999 --blr 1e-3 --min_lr 2e-3 --layer_decay 0.75 --beta2 0.999 --weight_decay 0.05
    --drop_path 0 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path {data}"""


@pytest.mark.slow
@pytest.mark.parametrize('command,mode,layers,drop_path', [
    (SEED_DISTILL, 'distill', 18, 0.2), (SEED_COPY, 'copy', 24, 0.0)])
def test_seed_commands_parse_and_start(command, mode, layers, drop_path, tmp_path):
    ckpt = tmp_path / 'mae_pretrain_vit_large.pth'
    ckpt.touch()
    os.makedirs(tmp_path / 'train')
    os.makedirs(tmp_path / 'val')
    argv = command.format(ckpt=ckpt, data=tmp_path).split() + ['--output_dir', str(tmp_path / 'out')]
    parser = main_finetune.get_args_parser()
    args = parser.parse_args(argv)
    assert args.global_pool and args.mode == mode and args.smoothing == 0.1 and args.aa == 'rand-m9-mstd0.5-inc1'
    run = main_finetune.resolve_args(args)
    assert run.ckpt is None and run.cfg.mixup_active  # --resume allow, nothing to resume yet
    model = main_finetune.build_model(run)
    assert len(model.student.blocks) == 24 and model.student.embed_dim == 1024
    assert model.layers == list(range(layers)) and model.last_teacher_layer == layers - 1
    assert getattr(model.student.blocks[-1].drop_path1, 'drop_prob', 0.0) == pytest.approx(drop_path)
    model.train()
    out = model(torch.randn(1, 3, 224, 224))
    logits = out[0] if isinstance(out, tuple) else out
    logits.sum().backward()
    assert logits.shape == (1, 1000)


# ---- moved from test_run_folder.py: probe mode, its derived epochs on resume and its originals ---------------------
@pytest.mark.slow
def test_probe_run_resumed_past_the_default_epochs_trains_on(tmp_path):
    target = make_image_folder(str(tmp_path / 'target'), classes=3, train_per_class=2, val_per_class=2)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=2, train_per_class=4, val_per_class=0)
    paths = sorted(os.path.relpath(os.path.join(d, f), wild) for d, _, fs in os.walk(wild) for f in fs)
    selection = str(tmp_path / 'selection.pth')
    torch.save({'root': wild, 'paths': paths, 'selected': torch.arange(8), 'nb_classes': 3, 'ranking': 'output'},
               selection)
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))
    out = str(tmp_path / 'probe')
    # 8 images, 8 x 55 presentations: int(55) - 1 = 54 epochs, more than --epochs' default of 50
    argv = ['--mode', 'probe', '--finetune', teacher, '--selection', selection, '--eval_data_path', target,
            '--model', 'vit_base_patch16_224', '--model_kwargs', 'patch_size=8', 'embed_dim=48', 'depth=4',
            'num_heads=3', '--input_size', '32', '--nb_classes', '3', '--batch_size', '8', '--presentations',
            str(8 * 55), '--teacher_acc', '0.9', '--eval_every', '100', '--save_every', '52', '--num_workers', '0',
            '--device', 'cpu', '--output_dir', out, '--print_freq', '100']
    main_finetune.run(argv)
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['epoch'] == 53
    os.remove(os.path.join(out, 'checkpoint.pth'))  # back to epoch 51 in the same folder, deliberately
    stats = main_finetune.run(argv + ['--resume', os.path.join(out, 'checkpoint-51.pth')])
    assert stats and stats['epoch'] == 53  # not "nothing to do": 52 of 54 epochs were done
    log = read_log(out)
    assert [e['epoch'] for e in log] == list(range(54))  # epochs 52 and 53 trained again, logged once
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['epoch'] == 53


def test_pos_num_originals_are_fingerprinted_relative_to_their_folder(tmp_path):
    from util.samplers import dataset_fingerprint
    from util.selection import labelled_originals, probe_training_set

    target = make_image_folder(str(tmp_path / 'target'), classes=3, train_per_class=3, val_per_class=0)
    moved = tmp_path / 'moved_target'
    shutil.copytree(target, moved)
    selection = {'root': str(tmp_path / 'wild'), 'paths': ['a.png', 'b.png'], 'selected': torch.tensor([1, 0])}

    def fingerprint(root):
        return dataset_fingerprint(probe_training_set(selection, labelled_originals(os.path.join(root, 'train'), 2),
                                                      32, 0.5))

    assert fingerprint(str(moved)) == fingerprint(target)
    first = sorted(os.listdir(moved / 'train' / 'class_1'))[0]
    os.rename(moved / 'train' / 'class_1' / first, moved / 'train' / 'class_1' / ('z' + first))
    assert fingerprint(str(moved)) != fingerprint(target)  # other originals: another training set
