"""End-to-end training on generated images: logs, checkpoints and learning in every mode, evaluation from a
checkpoint, torchrun, fp16 with a grad scaler."""
import glob
import math
import os

import pytest
import torch
from helpers import TINY, args_for, read_log, tiny_args, torchrun

import main_finetune
from models_vit import create_vit
from util.pretrained import read_checkpoint

MODES = ['none', 'copy', 'distill']


def train(workdir, name, *extra, epochs=2):
    out = str(workdir.root / name)
    stats = main_finetune.run(args_for(workdir, out, *extra, epochs=epochs))
    return out, stats


@pytest.fixture(scope='module')
def two_epoch_runs(workdir):
    return {mode: train(workdir, f'run_{mode}', '--mode', mode)[0] for mode in MODES}


# ---- two epochs per mode ------------------------------------------------------------------------------
@pytest.mark.slow
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
    n_student = sum(p.numel() for p in create_vit('vit_base_patch16_224', num_classes=3, **TINY).parameters())
    n_opt = sum(v['exp_avg'].numel() for v in ckpt['optimizer']['state'].values())
    assert n_opt == n_student


# ---- --eval --resume reproduces the logged accuracy -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_eval_resume_reproduces_logged_accuracy(two_epoch_runs, workdir, mode):
    out = two_epoch_runs[mode]
    last = read_log(out)[-1]
    stats = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--data_path',
                               workdir.data, '--device', 'cpu', '--num_workers', '0', '--batch_size', '5'])
    assert stats['test_acc1'] == pytest.approx(last['test_acc1'])
    assert stats['test_loss'] == pytest.approx(last['test_loss'], rel=1e-5)
    assert stats['test_images'] == 18


# ---- torchrun -------------------------------------------------------------------------------------------
@pytest.mark.slow
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


# ---- mixed precision ------------------------------------------------------------------------------------
def test_fp16_with_grad_scaler_trains(workdir, monkeypatch):
    """--amp fp16: the student's linear layers run under float16 autocast in training, and every optimizer step
    goes through the grad scaler: the loss is scaled before backward, the scaler steps and updates once a step."""
    activations, calls = [], {'scale': 0, 'step': 0, 'update': 0}
    forward = torch.nn.Linear.forward

    def recording(self, x):
        out = forward(self, x)
        if torch.is_grad_enabled():  # the student in training (its teacher and evaluation run without grad)
            activations.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'), out.dtype))
        return out

    monkeypatch.setattr(torch.nn.Linear, 'forward', recording)
    scale, step, update = torch.amp.GradScaler.scale, torch.amp.GradScaler.step, torch.amp.GradScaler.update

    def scaling(self, outputs):
        calls['scale'] += 1
        scaled = scale(self, outputs)
        assert self.is_enabled() and torch.equal(scaled, outputs * self.get_scale())
        return scaled

    def counting(name, method):
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return counted

    monkeypatch.setattr(torch.amp.GradScaler, 'scale', scaling)
    monkeypatch.setattr(torch.amp.GradScaler, 'step', counting('step', step))
    monkeypatch.setattr(torch.amp.GradScaler, 'update', counting('update', update))
    out, _ = train(workdir, 'fp16', '--mode', 'distill', '--amp', 'fp16', epochs=1)
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and math.isfinite(log[0]['test_acc1'])
    assert activations and set(activations) == {(True, torch.float16, torch.float16)}
    assert calls == {'scale': 6, 'step': 6, 'update': 6}  # 48 images in steps of 8, no aux optimizer
    saved = read_checkpoint(os.path.join(out, 'checkpoint.pth'))['scaler']
    # an enabled scaler's state: 2**16 halved once per step whose gradients overflowed (skipped), and the
    # count of steps applied since the last overflow; the last steps were applied
    overflows = math.log2(2.0 ** 16 / saved['scale'])
    assert overflows == int(overflows) and 1 <= saved['_growth_tracker'] <= 6 - overflows


# ---- gradient accumulation: every micro-batch of the epoch counts -----------------------------------------
@pytest.mark.parametrize('n_batches, steps_per_epoch, accum', [
    (6, 6, 4),   # a last window of 2 micro-batches, closed at the epoch's end
    (3, 3, 4),   # a loader shorter than one window still updates the model
    (8, 8, 4),   # whole windows only
    (5, 6, 4),   # a loader that ends before steps_per_epoch: its last window as far as it went
])
def test_each_window_applies_the_mean_gradient_of_its_micro_batches(n_batches, steps_per_epoch, accum):
    import copy

    import torch.nn.functional as F

    from engine_finetune import TrainingStep, train_one_epoch
    from util.lr_sched import Schedule

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,)), 0) for _ in range(n_batches)]
    lr = 0.5
    # independently: plain SGD steps, each the mean of the micro-batch gradients of its window; windows of
    # `accum` micro-batches, the last one as long as the epoch's data leave
    expected = copy.deepcopy(model)
    for start in range(0, n_batches, accum):
        grads = [torch.autograd.grad(F.cross_entropy(expected(x), y), list(expected.parameters()))
                 for x, y, _ in data[start:start + accum]]
        with torch.no_grad():
            for i, p in enumerate(expected.parameters()):
                p -= lr * sum(g[i] for g in grads) / len(grads)

    def criterion(outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        return loss, {'loss': loss}

    step = TrainingStep(model, criterion, torch.optim.SGD(model.parameters(), lr=lr), torch.amp.GradScaler(
        'cpu', enabled=False), torch.device('cpu'), accum_iter=accum)
    train_one_epoch(step, data, 0, Schedule(lr, lr, 0, 1, 'step'), print_freq=100, steps_per_epoch=steps_per_epoch)
    for name, a, b in zip(('weight', 'bias'), model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
