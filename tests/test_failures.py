"""Runs that never lose work (issue 11): stops at any step, non-finite state, resume with another batch size
or number of ranks, output folders that cannot be written or would overwrite an input, stale temporary
files, a full disk, two runs in one folder, SIGINT / SIGTERM, and the logs of a resumed epoch."""
import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, free_port, make_image_folder, make_teacher_checkpoint, tiny_args

import main_finetune
import util.checkpoint
from engine_finetune import NonFiniteLossError
from util.checkpoint import NonFiniteStateError, resume_step, save_atomic
from util.datasets import RobustImageFolder
from util.errors import UserError
from util.losses import TransferCriterion
from util.output import RunLock, check_inputs_not_overwritten, write_log
from util.pretrained import read_checkpoint
from util.run_control import Preempted, clear_stop, request_stop, stop_on_signals, stop_requested


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('failures')
    data = make_image_folder(str(root / 'data'))  # 48 training images: 6 steps of 8
    teacher = make_teacher_checkpoint(str(root / 'teacher.pth'))
    return SimpleNamespace(root=root, data=data, teacher=teacher)


def args_for(workdir, out, *extra, epochs=2):
    return tiny_args(workdir.data, str(out), '--finetune', workdir.teacher, '--lr', '3e-3', *extra, epochs=epochs)


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in log.txt')) for line in f]


def stop_at_forward(monkeypatch, n: int) -> None:
    """Request a stop (as the preemption handler does) during the n-th forward pass of the run (1-based)."""
    forward, calls = TransferCriterion.forward, [0]

    def forward_then_stop(self, outputs, targets):
        calls[0] += 1
        if calls[0] == n:
            request_stop()
        return forward(self, outputs, targets)

    monkeypatch.setattr(TransferCriterion, 'forward', forward_then_stop)


def run_until_stopped(workdir, monkeypatch, out, n_forward, *extra, epochs=2) -> Preempted:
    stop_at_forward(monkeypatch, n_forward)
    try:
        with pytest.raises(Preempted) as stop:
            main_finetune.run(args_for(workdir, out, *extra, epochs=epochs))
    finally:
        clear_stop()
        monkeypatch.undo()
    return stop.value


def trained_indices(monkeypatch) -> list:
    """Record every training sample the loader reads (num_workers 0: in this process)."""
    seen, getitem = [], RobustImageFolder.__getitem__

    def recording(self, index):
        if os.path.basename(self.root) == 'train':
            seen.append(index)
        return getitem(self, index)

    monkeypatch.setattr(RobustImageFolder, '__getitem__', recording)
    return seen


# ---- bug 1: a stop in the last --print_freq window of an epoch ----------------------------------------
def test_stop_in_last_window_saves_epoch_end_and_resumes(workdir, monkeypatch):
    out = workdir.root / 'last_window'
    # print_freq 4 of 6 steps: the read-backs are at steps 4 and 6; the stop arrives during step 5
    stop = run_until_stopped(workdir, monkeypatch, out, 5, '--print_freq', '4')
    assert (stop.epoch, stop.step) == (0, 6)
    saved = read_checkpoint(str(out / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (0, None)  # an end-of-epoch checkpoint
    assert [e['epoch'] for e in read_log(str(out))] == [0]
    main_finetune.run(args_for(workdir, out, '--print_freq', '4', '--resume', 'allow'))
    assert [e['epoch'] for e in read_log(str(out))] == [0, 1]

    # the other end: a checkpoint written by the old code at step == steps_per_epoch must resume too
    old = {k: v for k, v in saved.items() if k not in ('samples', 'world_size', 'partial_epoch', 'rng_per_rank')}
    old['step'] = 6
    torch.save(old, str(out / 'old.pth'))
    resumed = workdir.root / 'old_resumed'
    main_finetune.run(args_for(workdir, resumed, '--print_freq', '4', '--resume', str(out / 'old.pth')))
    assert [e['epoch'] for e in read_log(str(resumed))] == [0, 1]
    assert read_checkpoint(str(resumed / 'checkpoint.pth'))['epoch'] == 1


# ---- bug 2: no checkpoint with non-finite state; log.txt stays JSON ---------------------------------
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


def test_log_txt_stays_strict_json(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path))
    write_log(args, {'epoch': 0, 'test_loss': float('inf'), 'train_loss': float('nan'), 'x': 1.5})
    assert read_log(str(tmp_path)) == [{'epoch': 0, 'test_loss': None, 'train_loss': None, 'x': 1.5}]


# ---- bug 3 and item 9: mid-epoch resume with another batch size or number of ranks; logs -------------
@pytest.fixture(scope='module')
def mid_epoch(workdir):
    """An uninterrupted 2-epoch run, and the same run stopped after 2 steps (16 samples) of epoch 1."""
    mp = pytest.MonkeyPatch()
    full = workdir.root / 'mid_full'
    main_finetune.run(args_for(workdir, full))
    part = workdir.root / 'mid_part'
    stop = run_until_stopped(workdir, mp, part, 6 + 2)
    assert (stop.epoch, stop.step) == (1, 2)
    return SimpleNamespace(full=full, part=part)


def resume_copy(workdir, mid_epoch, name: str):
    out = workdir.root / name
    shutil.copytree(mid_epoch.part, out)
    for events in glob.glob(str(out / 'events.out.tfevents.*')):
        os.remove(events)
    return out


def test_resume_step_rules():
    saved = {'epoch': 1, 'step': 2, 'samples': 16, 'world_size': 1, 'args': {'batch_size': 8, 'world_size': 1}}
    assert resume_step(saved, 'c.pth', 8, 1, 6) == (1, 2)
    assert resume_step(saved, 'c.pth', 2, 4, 6) == (1, 2)  # 8 a step on 4 ranks: the same positions
    assert resume_step(saved, 'c.pth', 4, 2, 1) == (1, 1)  # an epoch of one step of 8: nothing left of it
    assert resume_step({**saved, 'step': None}, 'c.pth', 12, 1, 4) == (2, 0)
    # a checkpoint of the old code: no 'samples', position from step x batch x world_size in args
    old = {'epoch': 0, 'step': 3, 'args': {'batch_size': 4, 'world_size': 2}}
    assert resume_step(old, 'c.pth', 8, 1, 6) == (0, 3)
    with pytest.raises(UserError, match=r"24 samples of epoch 0 .*--batch_size 4 on 2 rank"):
        resume_step(old, 'c.pth', 16, 1, 3)


def test_mid_epoch_checkpoint_records_samples_and_world_size(mid_epoch):
    saved = read_checkpoint(str(mid_epoch.part / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step'], saved['samples'], saved['world_size']) == (1, 2, 16, 1)


def test_same_batch_resume_logs_whole_epoch_and_purges_exactly(workdir, mid_epoch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workdir.root / 'mid_same'
    shutil.copytree(mid_epoch.part, out)
    main_finetune.run(args_for(workdir, out, '--resume', 'allow'))
    # the epoch's log line covers all 6 steps, as the uninterrupted run's
    resumed, full = read_log(str(out)), read_log(str(mid_epoch.full))
    assert [e['epoch'] for e in resumed] == [0, 1]
    assert resumed[1]['train_loss'] == pytest.approx(full[1]['train_loss'], rel=1e-6)
    # TensorBoard keeps the points trained before the stop and drops none twice
    events = EventAccumulator(str(out))
    events.Reload()
    steps = [e.step for e in events.Scalars('train/loss')]
    assert steps == [333, 666, 1000, 1333, 1666, 2000]


@pytest.mark.parametrize('batch,start_step,steps', [(4, 4, 12), (16, 1, 3)])
def test_resume_with_another_batch_size_trains_each_sample_once(workdir, mid_epoch, monkeypatch, capsys, batch,
                                                                start_step, steps):
    out = resume_copy(workdir, mid_epoch, f'mid_batch{batch}')
    seen = trained_indices(monkeypatch)
    main_finetune.run(args_for(workdir, out, '--resume', 'allow', '--batch_size', str(batch), '--print_freq', '1'))
    text = capsys.readouterr().out
    assert f'epoch 1, step {start_step} of {steps} (16 samples' in text
    done = re.findall(rf'Epoch \[1\] \[(\d+)/{steps}\]', text)
    assert done == [str(i) for i in range(start_step + 1, steps + 1)]
    first_part = read_checkpoint(str(mid_epoch.part / 'checkpoint.pth'))
    assert first_part['samples'] == 16
    # the stopped run trained the first 16 of epoch 1's order; the resumed one exactly the other 32
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0 + 1)).tolist()
    assert sorted(seen) == sorted(order[16:])
    assert len(read_log(str(out))) == 2


def test_resume_with_a_batch_size_that_does_not_divide_the_position_is_refused(workdir, mid_epoch):
    out = resume_copy(workdir, mid_epoch, 'mid_batch12')
    before = open(out / 'checkpoint.pth', 'rb').read()
    with pytest.raises(UserError, match=r"(?s)16 samples of epoch 1.*--batch_size 12.*--batch_size 8"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow', '--batch_size', '12'))
    assert open(out / 'checkpoint.pth', 'rb').read() == before


def test_resume_one_rank_checkpoint_on_two_ranks(workdir, mid_epoch):
    out = resume_copy(workdir, mid_epoch, 'mid_ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(free_port()), os.path.join(ROOT, 'tests', 'ddp_worker.py'),
           *args_for(workdir, out, '--resume', 'allow', '--print_freq', '1')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 48 images on 2 ranks of 8: 3 steps an epoch; 16 samples done is exactly step 1
    assert 'epoch 1, step 1 of 3 (16 samples' in proc.stdout
    assert re.findall(r'Epoch \[1\] \[(\d)/3\]', proc.stdout) == ['2', '3']
    assert [e['epoch'] for e in read_log(str(out))] == [0, 1]


# ---- bug 4: an output folder that cannot be written; free space ----------------------------------------
def make_unwritable(folder) -> bool:
    os.makedirs(folder)
    if os.geteuid() == 0:
        if not shutil.which('chattr') or subprocess.run(['chattr', '+i', str(folder)]).returncode:
            return False
    else:
        os.chmod(folder, 0o555)
    try:
        open(os.path.join(folder, 'probe'), 'w').close()
    except OSError:
        return True
    os.remove(os.path.join(folder, 'probe'))
    return False


def test_unwritable_output_dir_is_found_before_training(workdir, capsys):
    out = workdir.root / 'readonly'
    if not make_unwritable(out):
        pytest.skip('cannot make a folder unwritable here')
    try:
        with pytest.raises(UserError, match=r"--output_dir .*readonly.* cannot be written"):
            main_finetune.run(args_for(workdir, out, epochs=1))
    finally:
        if os.geteuid() == 0:
            subprocess.run(['chattr', '-i', str(out)])
    assert 'Epoch [0]' not in capsys.readouterr().out


def test_little_free_space_warns_with_the_checkpoint_size(workdir, monkeypatch):
    usage = shutil.disk_usage(str(workdir.root))
    monkeypatch.setattr('util.output.shutil.disk_usage', lambda path: usage._replace(free=1000))
    with pytest.warns(UserWarning, match=r'1000 B free .*checkpoint of about'):
        main_finetune.run(args_for(workdir, workdir.root / 'small_disk', epochs=1))


# ---- bug 5: outputs that would replace an input ----------------------------------------------------------
def test_finetune_from_the_runs_own_numbered_checkpoint_is_refused(workdir):
    out = workdir.root / 'own_source'
    os.makedirs(out)
    shutil.copy(workdir.teacher, out / 'checkpoint-0.pth')
    before = open(out / 'checkpoint-0.pth', 'rb').read()
    with pytest.raises(UserError, match=r"--finetune .*checkpoint-0.pth.* would be overwritten"):
        main_finetune.run(tiny_args(workdir.data, str(out), '--finetune', str(out / 'checkpoint-0.pth'),
                                    '--save_every', '1', epochs=1))
    assert open(out / 'checkpoint-0.pth', 'rb').read() == before


def test_inputs_not_overwritten_rules(tmp_path):
    out = str(tmp_path)
    base = dict(output_dir=out, finetune='', resume='', ensemble_with='', selection='', eval=False, epochs=10,
                save_every=5)
    check_inputs_not_overwritten(SimpleNamespace(**base, ), start_epoch=0)
    # the run's own checkpoint.pth is what a resumed run continues: allowed
    check_inputs_not_overwritten(SimpleNamespace(**{**base, 'resume': f'{out}/checkpoint.pth'}), start_epoch=3)
    # an older numbered checkpoint that this run will not write again: allowed
    check_inputs_not_overwritten(SimpleNamespace(**{**base, 'resume': f'{out}/checkpoint-4.pth'}), start_epoch=5)
    for flag, name in (('resume', 'checkpoint-9.pth'), ('selection', 'log.txt'), ('finetune', 'checkpoint.pth')):
        with pytest.raises(UserError, match=rf"--{flag} .*{name}.* would be overwritten"):
            check_inputs_not_overwritten(SimpleNamespace(**{**base, flag: f'{out}/{name}'}), start_epoch=5)


# ---- item 6: stale temporary files, permissions, a full disk ------------------------------------------
def test_stale_temporaries_of_the_run_are_removed_at_start(workdir, capsys):
    out = workdir.root / 'stale'
    os.makedirs(out)
    (out / 'checkpoint.pth.k2j4h1x9.tmp').write_bytes(b'x' * 1000)
    (out / 'checkpoint-3.pth.abcdefgh.tmp').write_bytes(b'x')
    (out / 'notes.tmp').write_bytes(b'mine')
    main_finetune.run(args_for(workdir, out, epochs=1))
    assert sorted(p.name for p in out.glob('*.tmp')) == ['notes.tmp']
    assert 'removed 2 stale temporary files' in capsys.readouterr().out


def test_checkpoints_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({'x': 1}, str(tmp_path / 'c.pth'))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'c.pth').st_mode & 0o777 == 0o644


def test_full_disk_during_a_save_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    save_atomic({'epoch': 4}, path)

    def full_disk(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(util.checkpoint.torch, 'save', full_disk)
    with pytest.raises(UserError, match=r"No space left on device.*checkpoint.pth"):
        save_atomic({'epoch': 5}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)['epoch'] == 4
    assert os.listdir(tmp_path) == ['checkpoint.pth']


# ---- item 7: two runs in one output folder -------------------------------------------------------------
def write_lock(folder, **fields):
    os.makedirs(folder, exist_ok=True)
    info = {'host': socket.gethostname(), 'pid': os.getpid(), 'job_id': None, 'started': 'earlier', **fields}
    with open(os.path.join(folder, RunLock.NAME), 'w') as f:
        json.dump(info, f)


def test_second_run_in_a_locked_folder_is_refused(workdir, capsys):
    out = workdir.root / 'locked'
    sleeper = subprocess.Popen(['sleep', '60'])
    try:
        write_lock(out, pid=sleeper.pid)
        with pytest.raises(UserError, match=rf"(?s)--output_dir .*locked.* is in use by .*pid {sleeper.pid}"):
            main_finetune.run(args_for(workdir, out, epochs=1))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert 'Epoch [0]' not in capsys.readouterr().out
    # the process is gone: its lock is stale and is taken over, with a line saying so
    main_finetune.run(args_for(workdir, out, epochs=1))
    assert f'stale lock of pid {sleeper.pid}' in capsys.readouterr().out
    assert not os.path.exists(out / RunLock.NAME)  # released at the end


def test_lock_rules(tmp_path, monkeypatch):
    other = str(tmp_path / 'other_host')
    write_lock(other, host='node-that-is-not-this-one', pid=1)
    with pytest.raises(UserError, match=r"(?s)node-that-is-not-this-one.*cannot check.*delete .*\.lock"):
        RunLock(other).acquire()
    # a requeued SLURM job takes its own lock over, wherever it ran before
    requeued = str(tmp_path / 'requeued')
    write_lock(requeued, host='node-that-is-not-this-one', pid=1, job_id='4242')
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    lock = RunLock(requeued)
    lock.acquire()
    assert json.load(open(os.path.join(requeued, RunLock.NAME)))['pid'] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(requeued, RunLock.NAME))


# ---- item 8: SIGINT and SIGTERM outside SLURM -------------------------------------------------------------
def start_run(workdir, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, 'main_finetune.py'),
           *args_for(workdir, out, '--print_freq', '1', *extra, epochs=50)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for_line(proc, pattern: str, timeout: float = 120) -> str:
    deadline, text = time.time() + timeout, ''
    while time.time() < deadline:
        line = proc.stdout.readline()
        text += line
        if re.search(pattern, line):
            return text
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f'no line matching {pattern!r}: {text[-2000:]}')


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


def test_second_sigint_exits_at_once(workdir):
    # the first sync point is the epoch's end (6 steps away), so both signals arrive while the run trains
    proc = start_run(workdir, workdir.root / 'sigint_twice', '--print_freq', '6')
    wait_for_line(proc, r'start training for')
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert 'Traceback' not in stderr
    assert 'SIGINT received: stopping at the next step' in stderr
    assert 'second SIGINT: exiting now' in stderr


def test_a_signal_stops_only_the_run_it_arrived_in():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop_requested()
    assert not stop_requested()  # a later run in this process (e.g. the demo's next one) is not stopped
    assert signal.getsignal(signal.SIGTERM) is before
