"""What a run writes into its output folder, and when it refuses to: --log_dir following --output_dir,
checkpoint-best.pth (--save_best), best and final accuracy in log.txt (strict JSON), checkpoints written
atomically (a kill or a full disk mid-write keeps the previous one, the umask's permissions), periodic
checkpoints inside an epoch, folders that cannot be written or would overwrite an input, stale temporary
files, little free space, and two runs in one folder."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, args_for, read_log, tiny_args

import main_finetune
import util.checkpoint
from util.checkpoint import save_atomic
from util.errors import UserError
from util.output import BestAccuracy, RunLock, check_inputs_not_overwritten, write_log
from util.pretrained import read_checkpoint


# ---- logs, and the best and final accuracy ----------------------------------------------------------
def test_log_dir_defaults_to_output_dir(ema_distill_run):
    out = ema_distill_run.out
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out))
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['args']['log_dir'] == out


def test_save_best_keeps_the_epoch_of_the_best_ema_top1(ema_distill_run):
    out, log = ema_distill_run.out, ema_distill_run.log
    accs = [line['ema_test_acc1'] for line in log]
    best_epoch = accs.index(max(accs))  # the first epoch that reached the best (later ties do not replace it)
    best = read_checkpoint(os.path.join(out, 'checkpoint-best.pth'))
    assert best['epoch'] == best_epoch
    assert best['best']['ema_test_acc1'] == {'acc1': max(accs), 'epoch': best_epoch}
    last = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    if best_epoch == len(log) - 1:
        assert all(torch.equal(best['model'][k], last['model'][k]) for k in last['model'])
    assert last['best'] == best['best'] or best_epoch < len(log) - 1


def test_log_records_best_and_final_raw_and_ema(ema_distill_run):
    stats, log = ema_distill_run.stats, ema_distill_run.log
    for n, line in enumerate(log, start=1):
        for key in ('test_acc1', 'ema_test_acc1'):
            seen = [entry[key] for entry in log[:n]]
            assert line[f'best_{key}'] == max(seen)
            assert line[f'best_{key}_epoch'] == seen.index(max(seen))
    assert stats['best_test_acc1'] == log[-1]['best_test_acc1'] and stats['test_acc1'] == log[-1]['test_acc1']


def test_summary_line_names_best_and_final():
    best = BestAccuracy()
    best.update({'test_acc1': 50.0, 'ema_test_acc1': 40.0}, 0)
    best.update({'test_acc1': 45.0, 'ema_test_acc1': 60.0}, 1)
    line = best.summary({'test_acc1': 45.0, 'ema_test_acc1': 60.0})
    assert line == ('top-1 accuracy raw: final 45.00%, best 50.00% (epoch 0); '
                    'EMA: final 60.00%, best 60.00% (epoch 1)')


def test_save_best_ema_needs_an_ema(shared_images, tmp_path):
    data = shared_images(train_per_class=1, val_per_class=1)
    with pytest.raises(UserError, match='--save_best ema'):
        main_finetune.run(tiny_args(data, str(tmp_path / 'o'), '--save_best', 'ema'))


def test_log_txt_stays_strict_json(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path))
    write_log(args, {'epoch': 0, 'test_loss': float('inf'), 'train_loss': float('nan'), 'x': 1.5})
    assert read_log(str(tmp_path)) == [{'epoch': 0, 'test_loss': None, 'train_loss': None, 'x': 1.5}]


# ---- checkpoints: periodic, atomic, with the umask's permissions ---------------------------------------
def test_periodic_checkpoints_inside_an_epoch(workdir, capsys):
    out = str(workdir.root / 'periodic')
    main_finetune.run(args_for(workdir, out, '--checkpoint_minutes', '1e-9', '--print_freq', '2', epochs=1))
    printed = capsys.readouterr().out
    written = re.findall(r'checkpoint written at epoch 0, step (\d)/6', printed)
    assert written == ['2', '4']  # and at the epoch's end the epoch checkpoint
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['step'] is None
    # the same run's progress lines (their numbers: tests/test_data_loading.py), training then evaluation
    assert re.search(r'Epoch \[0\] \[2/6\] .* img/s  data \d+%  eta \d+:\d\d:\d\d \(run \d+:\d\d:\d\d\)', printed)
    assert re.findall(r'Test \[model\] \[(\d)/3\]  data \d+%  eta \d+:\d\d:\d\d', printed) == ['2']


@pytest.mark.slow
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


# ---- an output folder that cannot be written; free space ----------------------------------------------
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


# ---- outputs that would replace an input ---------------------------------------------------------------
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


# ---- stale temporary files -------------------------------------------------------------------------------
def test_stale_temporaries_of_the_run_are_removed_at_start(workdir, capsys):
    out = workdir.root / 'stale'
    os.makedirs(out)
    (out / 'checkpoint.pth.k2j4h1x9.tmp').write_bytes(b'x' * 1000)
    (out / 'checkpoint-3.pth.abcdefgh.tmp').write_bytes(b'x')
    (out / 'notes.tmp').write_bytes(b'mine')
    main_finetune.run(args_for(workdir, out, epochs=1))
    assert sorted(p.name for p in out.glob('*.tmp')) == ['notes.tmp']
    assert 'removed 2 stale temporary files' in capsys.readouterr().out


# ---- two runs in one output folder -----------------------------------------------------------------------
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
