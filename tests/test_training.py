"""End-to-end training on generated images: logs, checkpoints, resume, evaluation, bad data, torchrun."""
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, free_port, make_image_folder, make_teacher_checkpoint, tiny_args

import main_finetune
from engine_finetune import NonFiniteLossError
from models_dual_vit import create_vit
from util.checkpoint import save_atomic
from util.datasets import DataError
from util.errors import UserError
from util.losses import TransferCriterion
from util.lr_decay import param_groups_lrd
from util.lr_sched import Schedule, adjust_learning_rate
from util.pretrained import read_checkpoint
from util.run_control import Preempted, clear_stop, request_stop

MODES = ['none', 'copy', 'distill']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('training')
    data = make_image_folder(str(root / 'data'))
    teacher = make_teacher_checkpoint(str(root / 'teacher.pth'))
    return SimpleNamespace(root=root, data=data, teacher=teacher, runs={})


def train(workdir, name, *extra, epochs=2):
    out = str(workdir.root / name)
    stats = main_finetune.run(tiny_args(workdir.data, out, '--finetune', workdir.teacher, '--lr', '3e-3',
                                        *extra, epochs=epochs))
    return out, stats


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def two_epoch_runs(workdir):
    return {mode: train(workdir, f'run_{mode}', '--mode', mode)[0] for mode in MODES}


# ---- 1. two epochs per mode ----------------------------------------------------------------------
@pytest.mark.parametrize('mode', MODES)
def test_two_epochs_write_logs_checkpoints_and_learn(two_epoch_runs, mode):
    out = two_epoch_runs[mode]
    log = read_log(out)
    assert [e['epoch'] for e in log] == [0, 1]
    assert log[1]['train_loss'] < log[0]['train_loss']
    assert ('train_loss_atd' in log[0]) == (mode == 'distill')
    assert all(math.isfinite(e['test_acc1']) for e in log)
    assert glob.glob(os.path.join(out, 'events.out.tfevents.*'))
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert os.path.isfile(os.path.join(out, 'checkpoint-1.pth'))
    assert ckpt['epoch'] == 1 and ckpt['step'] is None and ckpt['args']['mode'] == mode
    assert {'model', 'optimizer', 'scaler', 'rng'} <= set(ckpt)
    assert ('teacher' in ckpt) == (mode == 'copy')
    assert not any(k.startswith('teacher.') for k in ckpt['model'])
    # the optimizer holds the student's parameters only
    n_student = sum(p.numel() for p in create_vit('vit_base_patch16_224', num_classes=3, img_size=32, patch_size=8,
                                                  embed_dim=48, depth=4, num_heads=3).parameters())
    n_opt = sum(v['exp_avg'].numel() for v in ckpt['optimizer']['state'].values())
    assert n_opt == n_student


# ---- 3. --eval --resume reproduces the logged accuracy -------------------------------------------
@pytest.mark.parametrize('mode', MODES)
def test_eval_resume_reproduces_logged_accuracy(two_epoch_runs, workdir, mode):
    out = two_epoch_runs[mode]
    last = read_log(out)[-1]
    stats = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--data_path',
                               workdir.data, '--device', 'cpu', '--num_workers', '0', '--batch_size', '5'])
    assert stats['test_acc1'] == pytest.approx(last['test_acc1'])
    assert stats['test_loss'] == pytest.approx(last['test_loss'], rel=1e-5)
    assert stats['test_images'] == 18


# ---- 2. resume is exact --------------------------------------------------------------------------
def test_resume_after_two_epochs_equals_three_uninterrupted(workdir):
    extra = ['--mode', 'distill', '--drop_path', '0.2', '--ema', '0.9', '--mixup', '0.8', '--cutmix', '1.0',
             '--reprob', '0.25', '--aa', 'rand-m9-mstd0.5-inc1', '--num_workers', '1', '--save_every', '1']
    full, _ = train(workdir, 'resume_full', *extra, epochs=3)
    out = str(workdir.root / 'resume_part')
    main_finetune.run(tiny_args(workdir.data, out, '--finetune', workdir.teacher, '--lr', '3e-3', *extra,
                                '--resume', os.path.join(full, 'checkpoint-1.pth'), epochs=3))
    a = read_checkpoint(os.path.join(full, 'checkpoint.pth'))
    b = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
    for pid, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg_sq'], b['optimizer']['state'][pid]['exp_avg_sq'])
    # the resumed run trained only the third epoch, and logged the same numbers for it
    assert [e['epoch'] for e in read_log(out)] == [2]
    assert read_log(out)[-1] == read_log(full)[-1]


def test_stop_mid_epoch_saves_position_and_resume_equals_uninterrupted(workdir, monkeypatch, capsys):
    extra = ['--mode', 'distill', '--drop_path', '0.2', '--ema', '0.9', '--mixup', '0.8', '--print_freq', '1',
             '--checkpoint_minutes', '0']
    full, _ = train(workdir, 'mid_full', *extra)
    forward, calls = TransferCriterion.forward, [0]

    def preempt_in_second_epoch(self, outputs, targets):
        calls[0] += 1
        if calls[0] == 6 + 3:  # the signal arrives during epoch 1, step 2 (0-based)
            request_stop()
        return forward(self, outputs, targets)

    monkeypatch.setattr(TransferCriterion, 'forward', preempt_in_second_epoch)
    with pytest.raises(Preempted) as stop:
        train(workdir, 'mid_part', *extra)
    clear_stop()
    monkeypatch.undo()
    assert (stop.value.epoch, stop.value.step) == (1, 3)
    out = str(workdir.root / 'mid_part')
    saved = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (1, 3)
    first = capsys.readouterr().out
    main_finetune.run(tiny_args(workdir.data, out, '--finetune', workdir.teacher, '--lr', '3e-3', *extra,
                                '--resume', 'allow'))
    second = capsys.readouterr().out
    pattern = r'Epoch \[1\] \[(\d)/6\]'
    steps = re.findall(pattern, first.split('mid_part')[-1]) + re.findall(pattern, second)
    assert steps == ['1', '2', '3', '4', '5', '6']  # every step of the epoch once: none twice, none skipped
    a = read_checkpoint(os.path.join(full, 'checkpoint.pth'))
    b = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'


def test_periodic_checkpoints_inside_an_epoch(workdir, capsys):
    out, _ = train(workdir, 'periodic', '--checkpoint_minutes', '1e-9', '--print_freq', '2', epochs=1)
    printed = capsys.readouterr().out
    written = re.findall(r'checkpoint written at epoch 0, step (\d)/6', printed)
    assert written == ['2', '4']  # and at the epoch's end the epoch checkpoint
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['step'] is None
    # the same run's progress lines (their numbers: tests/test_data_loading.py), training then evaluation
    assert re.search(r'Epoch \[0\] \[2/6\] .* img/s  data \d+%  eta \d+:\d\d:\d\d \(run \d+:\d\d:\d\d\)', printed)
    assert re.findall(r'Test \[model\] \[(\d)/3\]  data \d+%  eta \d+:\d\d:\d\d', printed) == ['2']


# ---- 5. bad data, and a kill during a checkpoint write ---------------------------------------------
def test_corrupt_image_is_skipped_and_counted(workdir, tmp_path):
    data = str(tmp_path / 'data')
    shutil.copytree(workdir.data, data)
    for split in ('train', 'val'):
        with open(os.path.join(data, split, 'class_0', 'broken.png'), 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n' + os.urandom(200))
    with pytest.warns(UserWarning, match='skipping undecodable image .*broken.png'):
        main_finetune.run(tiny_args(data, str(tmp_path / 'out'), '--batch_size', '7', epochs=1))
    log = read_log(str(tmp_path / 'out'))
    assert log[0]['test_skipped_images'] == 1 and log[0]['test_images'] == 18
    # 49 training images in batches of 7: the broken one lies in exactly one of the 7 batches
    assert log[0]['train_skipped_images'] == 1


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


def test_non_finite_loss_stops_with_message_and_keeps_last_checkpoint(workdir, monkeypatch):
    forward, calls = TransferCriterion.forward, [0]

    def nan_in_second_epoch(self, outputs, targets):
        loss, terms = forward(self, outputs, targets)
        calls[0] += 1
        if calls[0] == 6 + 4:  # epoch 1, step 3 (6 steps per epoch)
            loss = loss * float('nan')
            terms = {**terms, 'loss': loss}
        return loss, terms

    monkeypatch.setattr(TransferCriterion, 'forward', nan_in_second_epoch)
    with pytest.raises(NonFiniteLossError, match=r'epoch 1, step 3 of 6: loss=nan'):
        train(workdir, 'nan_run', '--print_freq', '5', epochs=3)
    ckpt = read_checkpoint(str(workdir.root / 'nan_run' / 'checkpoint.pth'))
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    path = str(tmp_path / 'checkpoint.pth')
    save_atomic({'epoch': 4, 'w': torch.arange(10)}, path)
    flag = tmp_path / 'writing'
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {ROOT!r})
        from util.checkpoint import save_atomic

        class Slow:
            def __reduce__(self):
                open({str(flag)!r}, 'w').close()
                time.sleep(60)
                return (int, (0,))

        save_atomic({{'epoch': 5, 'w': torch.zeros(10_000_000), 'slow': Slow()}}, {path!r})
    """)
    proc = subprocess.Popen([sys.executable, '-c', script])
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), 'the writer never started'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = read_checkpoint(path)
    assert ckpt['epoch'] == 4 and torch.equal(ckpt['w'], torch.arange(10))


# ---- 7. layer-wise lr decay ----------------------------------------------------------------------
def test_layer_wise_lr_decay_matches_formula():
    depth, decay = 4, 0.75
    student = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, patch_size=8, embed_dim=48,
                         depth=depth, num_heads=3)
    optimizer = torch.optim.AdamW(param_groups_lrd(student, 0.05, student.no_weight_decay(), decay))
    args = Schedule(lr=1e-3, min_lr=1e-6, warmup_epochs=1, epochs=5)
    epoch = 2.5
    adjust_learning_rate(optimizer, epoch, args)
    base = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / (5 - 1)))
    num_layers = depth + 1
    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for name in group['names']:
            lr_of[name], wd_of[name] = group['lr'], group['weight_decay']
    for name in lr_of:
        if name.startswith('blocks.'):
            i = int(name.split('.')[1])
            expected = base * decay ** (num_layers - (i + 1))
        elif name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            expected = base * decay ** num_layers
        else:
            expected = base
        assert lr_of[name] == pytest.approx(expected, rel=1e-12), name
    assert wd_of['pos_embed'] == wd_of['cls_token'] == wd_of['blocks.0.norm1.weight'] == 0.0
    assert wd_of['blocks.0.attn.qkv.weight'] == wd_of['head.weight'] == 0.05
    adjust_learning_rate(optimizer, 0.25, args)  # warmup: linear
    assert lr_of and optimizer.param_groups[0]['lr'] / optimizer.param_groups[0]['lr_scale'] == pytest.approx(2.5e-4)


# ---- 6. the seed's commands ----------------------------------------------------------------------
SEED_DISTILL = """--batch_size 32 --model dual_vit_large_patch16 --mode distill --end_layer -6 --atd_weight 3.0
    --finetune {ckpt} --resume allow --epochs 200 --ema 0.9999 --blr 1e-4 --layer_decay 1 --beta2 0.95
    --warmup_epochs 20 --weight_decay 0.3 --drop_path 0.2 --reprob 0.25 --mixup 0.8 --cutmix 1.0
    --dist_eval --data_path {data}"""
SEED_COPY = """--batch_size 32 --model dual_vit_large_patch16 --mode copy --finetune {ckpt} --resume allow
    --epochs 100 --ema 0.9999 --blr 1e-3 --min_lr 2e-3 --layer_decay 0.75 --beta2 0.999 --weight_decay 0.05
    --drop_path 0 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path {data}"""


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
    ckpt_state, _ = main_finetune.resolve_args(args)
    assert ckpt_state is None and args.mixup_active  # --resume allow, nothing to resume yet
    model = main_finetune.build_model(args)
    assert len(model.student.blocks) == 24 and model.student.embed_dim == 1024
    assert model.layers == list(range(layers)) and model.last_teacher_layer == layers - 1
    assert getattr(model.student.blocks[-1].drop_path1, 'drop_prob', 0.0) == pytest.approx(drop_path)
    model.train()
    out = model(torch.randn(1, 3, 224, 224))
    logits = out[0] if isinstance(out, tuple) else out
    logits.sum().backward()
    assert logits.shape == (1, 1000)


# ---- 4. torchrun -------------------------------------------------------------------------------
def torchrun(args, env=None, timeout=240):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(free_port()), os.path.join(ROOT, 'tests', 'ddp_worker.py'), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def test_torchrun_two_processes_train_evaluate_and_agree(workdir):
    out = str(workdir.root / 'ddp')
    proc = torchrun(tiny_args(workdir.data, out, '--mode', 'distill', '--finetune', workdir.teacher,
                              '--lr', '3e-3', '--dist_eval', '--drop_path', '0.1', '--batch_size', '4'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for epoch in (0, 1):
        r0 = torch.load(os.path.join(out, f'rank0_epoch{epoch}.pt'))
        r1 = torch.load(os.path.join(out, f'rank1_epoch{epoch}.pt'))
        assert all(torch.equal(v, r1[k]) for k, v in r0.items())
    log = read_log(out)
    assert len(log) == 2 and log[-1]['test_images'] == 18  # sharded evaluation counts every image once
    assert 'distributed: 2 processes, backend gloo' in proc.stdout


def test_torchrun_nan_on_one_rank_stops_both(workdir):
    out = str(workdir.root / 'ddp_nan')
    start = time.time()
    proc = torchrun(tiny_args(workdir.data, out, '--batch_size', '4', '--print_freq', '2'),
                    env={'NAN_ON_RANK': '1'}, timeout=180)
    assert proc.returncode != 0
    assert 'non-finite loss at epoch 0, a step on another rank' in proc.stderr + proc.stdout
    assert 'non-finite loss at epoch 0, step 3 of 6' in proc.stderr + proc.stdout
    assert time.time() - start < 120


def test_fp16_with_grad_scaler_trains(workdir):
    out, _ = train(workdir, 'fp16', '--mode', 'distill', '--amp', 'fp16', epochs=1)
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and math.isfinite(log[0]['test_acc1'])
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['scaler']['scale'] > 0
