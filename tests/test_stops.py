"""How a run stops: SIGINT / SIGTERM outside SLURM (at the next step, with a checkpoint; a second signal at
once), and a non-finite loss or model state (on every rank, naming the cause, never saving bad weights)."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from helpers import ROOT, args_for, read_log, run_args, run_until_stopped, stop_at_forward, tiny_args, torchrun

import main_finetune
import submitit_finetune
from engine_finetune import NonFiniteLossError
from util.checkpoint import NonFiniteStateError
from util.errors import DEBUG_ENV, run_cli
from util.losses import TransferCriterion
from util.output import RunLock, requeued_checkpoint
from util.pretrained import read_checkpoint
from util.run_control import clear_stop, reporting_stop, stop_on_signals, stop_requested


# ---- SIGINT and SIGTERM outside SLURM ---------------------------------------------------------------
def start_run(workdir, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, 'main_finetune.py'),
           *args_for(workdir, out, '--print_freq', '1', *extra, epochs=50)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for_line(proc, pattern: str, timeout: float = 120, stream=None) -> str:
    deadline, text = time.time() + timeout, ''
    while time.time() < deadline:
        line = (stream or proc.stdout).readline()
        text += line
        if re.search(pattern, line):
            return text
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f'no line matching {pattern!r}: {text[-2000:]}')


@pytest.mark.slow
def test_sigterm_stops_at_next_step_with_a_checkpoint(workdir):
    out = workdir.root / 'sigterm'
    proc = start_run(workdir, out)
    wait_for_line(proc, r'Epoch \[0\] \[2/6\]')
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stderr
    assert 'SIGTERM received: stopping at the next step' in stderr
    assert re.search(r'stopped: checkpoint written at epoch \d+, step \d+; continue with --resume allow', stderr)
    saved = read_checkpoint(str(out / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) >= (0, 2)
    assert not os.path.exists(out / RunLock.NAME)


@pytest.mark.slow
def test_second_sigint_exits_at_once(workdir):
    # the first sync point is the epoch's end (6 steps away), so both signals arrive while the run trains
    proc = start_run(workdir, workdir.root / 'sigint_twice', '--print_freq', '6')
    wait_for_line(proc, r'start training for')
    proc.send_signal(signal.SIGINT)
    # the second signal once the first was handled: two sent while Python waits in one long C call arrive as one
    first = wait_for_line(proc, r'SIGINT received: stopping at the next step', stream=proc.stderr)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = first + stderr
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stderr
    assert 'second SIGINT: exiting now' in stderr


def test_a_stop_without_an_output_folder_says_nothing_was_kept(workdir, monkeypatch, capsys):
    """--output_dir '' writes no checkpoint: the start says a stop keeps nothing, the periodic saves
    (--checkpoint_minutes) claim none, and the stop's line says that nothing was kept."""
    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, '_exit', exit_now)  # reporting_stop's exit, with the signal's status
    stop_at_forward(monkeypatch, 4)
    try:
        with pytest.raises(SystemExit):
            reporting_stop(main_finetune.run, args_for(workdir, '', '--checkpoint_minutes', '1e-9'))
    finally:
        clear_stop()
    out, err = capsys.readouterr()
    assert 'no --output_dir: no checkpoint is written, so a stop (SIGINT / SIGTERM) keeps nothing' in out
    assert 'checkpoint written' not in out + err
    assert 'stopped: at epoch 0, step 4; nothing was kept (no --output_dir)' in err


def test_a_signal_stops_only_the_run_it_arrived_in():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop_requested()
    assert not stop_requested()  # a later run in this process (e.g. the demo's next one) is not stopped
    assert signal.getsignal(signal.SIGTERM) is before


# ---- non-finite loss or state -------------------------------------------------------------------------
@pytest.mark.slow
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
        main_finetune.run(args_for(workdir, workdir.root / 'nan_run', '--print_freq', '5', epochs=3))
    ckpt = read_checkpoint(str(workdir.root / 'nan_run' / 'checkpoint.pth'))
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_non_finite_weights_are_never_saved(workdir, monkeypatch):
    out = workdir.root / 'nonfinite'
    step, calls = torch.optim.AdamW.step, [0]

    def overflow_on_last_update(self, *a, **k):
        result = step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 12:  # the last update of epoch 1: its loss was finite, its result is not
            with torch.no_grad():
                self.param_groups[0]['params'][0].fill_(float('inf'))
        return result

    monkeypatch.setattr(torch.optim.AdamW, 'step', overflow_on_last_update)
    with pytest.raises(NonFiniteStateError, match=r"(?s)non-finite values in the model.*not written.*"
                                                  r"last good checkpoint is .*checkpoint.pth \(end of epoch 0\)"):
        main_finetune.run(args_for(workdir, out, '--save_every', '1'))
    assert not os.path.exists(out / 'checkpoint-1.pth')
    for name in ('checkpoint.pth', 'checkpoint-0.pth'):
        ckpt = read_checkpoint(str(out / name))
        assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert not glob.glob(str(out / '*.tmp'))


def test_non_finite_distillation_term_does_not_blame_the_lr(workdir, monkeypatch):
    forward, calls = TransferCriterion.forward, [0]

    def atd_nan_at_step_3(self, outputs, targets):
        loss, terms = forward(self, outputs, targets)
        calls[0] += 1
        if calls[0] == 4:
            atd = terms['loss_atd'] * float('nan')
            terms = {**terms, 'loss_atd': atd, 'loss': terms['loss_task'] + atd}
            loss = terms['loss']
        return loss, terms

    monkeypatch.setattr(TransferCriterion, 'forward', atd_nan_at_step_3)
    with pytest.raises(NonFiniteLossError) as error:
        main_finetune.run(args_for(workdir, workdir.root / 'atd_nan', '--mode', 'distill', epochs=1))
    message = str(error.value)
    assert 'loss_atd=nan' in message and 'loss_task is finite' in message and '--atd_weight' in message
    assert 'Lower the learning rate' not in message


@pytest.mark.slow
def test_torchrun_nan_on_one_rank_stops_both(workdir):
    out = str(workdir.root / 'ddp_nan')
    start = time.time()
    proc = torchrun(tiny_args(workdir.data, out, '--batch_size', '4', '--print_freq', '2'),
                    env={'NAN_ON_RANK': '1'}, timeout=180)
    assert proc.returncode != 0
    assert 'non-finite loss at epoch 0, a step on another rank' in proc.stderr + proc.stdout
    assert 'non-finite loss at epoch 0, step 3 of 6' in proc.stderr + proc.stdout
    assert time.time() - start < 120


# ---- a requeued SLURM job continues its own run, whatever launched it ---------------------------------------
def slurm_job(restarts: int) -> dict:
    """The environment SLURM gives a job of a plain ``sbatch --requeue`` script: the same job id every time,
    SLURM_RESTART_COUNT counting the requeues."""
    return {'SLURM_JOB_ID': '4711', 'SLURM_RESTART_COUNT': str(restarts)}


@pytest.mark.slow
def test_requeued_sbatch_job_without_resume_continues_its_own_run(workdir, monkeypatch, capsys):
    out = workdir.root / 'sbatch_requeue'
    with mock.patch.dict(os.environ, slurm_job(0)):
        stop = run_until_stopped(workdir, monkeypatch, out, 6 + 2)  # stopped (SIGTERM) in epoch 1
    assert (stop.epoch, stop.step) == (1, 2)
    with mock.patch.dict(os.environ, slurm_job(1)):  # requeued: the same command, no --resume
        main_finetune.run(args_for(workdir, out))
    assert [e['epoch'] for e in read_log(out)] == [0, 1]
    assert 'requeued SLURM job 4711 (restart 1): continuing its own run' in capsys.readouterr().out


@pytest.mark.slow
def test_requeued_job_after_a_node_failure_takes_its_own_lock_over(workdir, monkeypatch, capsys):
    out = workdir.root / 'node_failure'
    with mock.patch.dict(os.environ, slurm_job(0)):
        run_until_stopped(workdir, monkeypatch, out, 6 + 2)
    # the node died (SIGKILL): the job's lock is left behind, written on another host
    (out / RunLock.NAME).write_text(json.dumps({'host': 'node-that-died', 'pid': 12345, 'job_id': '4711',
                                                'started': '2026-01-01T00:00:00'}))
    with mock.patch.dict(os.environ, slurm_job(2)):
        main_finetune.run(args_for(workdir, out))
    text = capsys.readouterr().out
    assert 'taking over the lock of SLURM job 4711 (this job, requeued)' in text
    assert [e['epoch'] for e in read_log(out)] == [0, 1]
    assert not os.path.exists(out / RunLock.NAME)


@pytest.mark.slow
def test_requeued_job_started_from_another_runs_checkpoint_continues_its_own(workdir, monkeypatch):
    source, out = workdir.root / 'someones_run', workdir.root / 'branch'
    main_finetune.run(args_for(workdir, source, epochs=1))
    given = ['--resume', str(source / 'checkpoint.pth')]
    with mock.patch.dict(os.environ, slurm_job(0)):
        stop = run_until_stopped(workdir, monkeypatch, out, 2, *given, epochs=3)  # epoch 1 of the branch
    assert (stop.epoch, stop.step) == (1, 2)
    with mock.patch.dict(os.environ, slurm_job(1)):  # requeued with its first command: --resume OTHER
        main_finetune.run(args_for(workdir, out, *given, epochs=3))
    assert [e['epoch'] for e in read_log(out)] == [1, 2]
    assert read_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == 2
    assert read_checkpoint(str(source / 'checkpoint.pth'))['epoch'] == 0  # the other run is untouched


def test_only_a_requeued_job_continues_the_folders_run(tmp_path):
    (tmp_path / 'checkpoint.pth').write_bytes(b'x')
    own = str(tmp_path / 'checkpoint.pth')
    for env, expected in (({}, None), (slurm_job(0), None), ({'SLURM_RESTART_COUNT': '1'}, None),
                          (slurm_job(1), own), (slurm_job(3), own)):
        with mock.patch.dict(os.environ, env, clear=False):
            for key in {'SLURM_JOB_ID', 'SLURM_RESTART_COUNT'} - set(env):
                os.environ.pop(key, None)
            assert requeued_checkpoint(str(tmp_path), '') == expected, env
    with mock.patch.dict(os.environ, slurm_job(1)):
        assert requeued_checkpoint(str(tmp_path), own, evaluating=True) is None
        os.remove(own)
        assert requeued_checkpoint(str(tmp_path), '') is None  # nothing of its own yet: it starts as the first time


# ---- moved from test_bad_input.py: a non-finite loss ---------------------------------------------------------------
@pytest.mark.slow
def test_non_finite_loss_is_one_error_line_naming_the_last_good_checkpoint(small_work, pair_runs, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    run = pair_runs['distill']
    out = str(tmp_path / 'resumed')
    shutil.copytree(run.out, out)
    poisoned = torch.load(run.teacher, weights_only=True)
    poisoned['model']['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    teacher = str(tmp_path / 'teacher.pth')
    shutil.copy(run.teacher, teacher)
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=False)
    ckpt['args']['finetune'] = teacher  # the run's own teacher file, which then goes bad
    torch.save(ckpt, os.path.join(out, 'checkpoint.pth'))
    torch.save(poisoned, teacher)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(reporting_stop, main_finetune.run, tiny_args(
            small_work.data, out, '--mode', 'distill', '--finetune', teacher, '--resume', 'allow', epochs=2))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith('error: non-finite loss at epoch 1, step 0 of 3: ')
    assert 'loss_atd=nan' in lines[0] and '(--finetune)' in lines[0]
    assert lines[0].endswith(f"the last good checkpoint is {os.path.join(out, 'checkpoint.pth')} (end of epoch 0).")


def test_nan_from_the_atd_term_does_not_blame_the_lr(small_work):
    bad_teacher = str(small_work.root / 'nan_teacher.pth')
    ckpt = torch.load(small_work.teacher, weights_only=True)
    ckpt['model']['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    torch.save(ckpt, bad_teacher)
    with pytest.raises(NonFiniteLossError) as err:
        main_finetune.run(run_args(small_work, 'nan_atd', '--mode', 'distill', '--finetune', bad_teacher))
    message = str(err.value)
    assert 'loss_atd' in message and 'teacher' in message and 'Lower the learning rate' not in message


# ---- moved from test_run_folder.py: a requeued job -----------------------------------------------------------------
def test_a_requeued_job_without_resume_continues_its_own_run(tmp_path, monkeypatch):
    seen = {}

    def fake_main(args):
        seen['resume'] = args.resume
        return {}

    class Env:
        job_id, global_rank, num_tasks, local_rank, node, num_nodes = '7', 0, 1, 0, 0, 1
        hostname, hostnames = 'n1', ['n1']

    monkeypatch.setattr(main_finetune, 'main', fake_main)
    monkeypatch.setattr(submitit_finetune.submitit, 'JobEnvironment', Env)
    monkeypatch.setattr(submitit_finetune.Trainer, '_install_preemption_handler', lambda self, args: None)
    args = submitit_finetune.parse_args(['--job_dir', str(tmp_path / '%j'), '--data_path', str(tmp_path)])
    with mock.patch.dict(os.environ, {'SLURM_RESTART_COUNT': '0'}):
        submitit_finetune.Trainer(args)()
    assert seen['resume'] == ''  # the first start is a fresh run (refused at submission if the folder holds one)
    with mock.patch.dict(os.environ, {'SLURM_RESTART_COUNT': '1'}):
        submitit_finetune.Trainer(args)()
    assert seen['resume'] == 'allow'
