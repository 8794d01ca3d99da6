"""The run folder has one owner: what a run writes into its output folder, and when it refuses to.

- Logs and records: --log_dir following --output_dir, checkpoint-best.pth (--save_best), the best and final
  accuracy in log.txt (strict JSON).
- Checkpoints: periodic ones inside an epoch, written atomically (a kill or a full disk mid-write keeps the
  previous one) with the umask's permissions; a best checkpoint written before the record that points at it;
  a stop between an epoch's checkpoint and its log line loses nothing.
- Refusals, answered before any work with one error line: a run never replaces another run's files or a file
  it reads, every file it will replace is checked at start, folders that cannot be written, two runs in one
  folder (the lock); a mid-epoch checkpoint continues only the same permutation.
- Housekeeping: stale temporary files, little free space, a truncated checkpoint, a requeued job.

The faults are real where the guarantee depends on them: a small tmpfs for a full disk, ``chattr +i`` for
a file or folder that cannot be changed (both need root; those tests skip otherwise). Where a fault is also
simulated (a full disk by a failing torch.save, an unwritable folder by chmod), the simulated test runs
without root too."""
import contextlib
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
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import (
    ROOT,
    TINY_ARCH,
    args_for,
    make_image_folder,
    make_teacher_checkpoint,
    make_unwritable,
    make_writable,
    read_log,
    run_until_stopped,
    tiny_args,
)

import engine_finetune
import main_finetune
import select_wild_data
import submitit_finetune
import util.checkpoint
from util.errors import UserError
from util.output import (
    EMPTY_LOCK_SECONDS,
    BestAccuracy,
    RunLock,
    check_inputs_not_overwritten,
    remove_stale_temporaries,
    save_atomic,
    write_log,
)
from util.pretrained import read_checkpoint
from util.run_control import Preempted
from util.selection import training_class_weights

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason='needs root (chattr, mount)')


def snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))
            if not name.startswith('events.out')}


@contextlib.contextmanager
def immutable(path):
    """``chattr +i`` on a file or folder, undone at the end; skips where the filesystem cannot do it."""
    if subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode:
        pytest.skip(f'chattr +i is not supported for {path}')
    try:
        yield
    finally:
        subprocess.run(['chattr', '-i', str(path)], check=True)


def no_training(monkeypatch):
    monkeypatch.setattr(engine_finetune, 'train_one_epoch', lambda *a, **k: pytest.fail('training started'))


# ---- logs, and the best and final accuracy ------------------------------------------------------------------
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


# ---- checkpoints: periodic, atomic, with the umask's permissions --------------------------------------------
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
        from util.output import save_atomic

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


# ---- the best checkpoint before the record that points at it ------------------------------------------------
@pytest.mark.slow
def test_kill_while_writing_the_best_checkpoint_loses_nothing(workdir, monkeypatch):
    out = workdir.root / 'best_kill'
    killed = []

    def kill_at_second_best(state, path):
        if path.endswith('checkpoint-best.pth') and state['epoch'] == 1 and not killed:
            killed.append(path)
            open(path + '.x1y2z3.tmp', 'wb').write(b'half a checkpoint')  # what a killed write leaves
            raise KeyboardInterrupt  # the process dies in the middle of this write
        save_atomic(state, path)

    def always_improves(self, stats, epoch):  # so that epoch 1 writes checkpoint-best.pth, whatever it scores
        for key in self.KEYS:
            if key in stats:
                self.best[key] = {'acc1': stats[key], 'epoch': epoch}
        return [key for key in self.KEYS if key in stats]

    monkeypatch.setattr(util.checkpoint, 'save_atomic', kill_at_second_best)
    monkeypatch.setattr(main_finetune.BestAccuracy, 'update', always_improves)
    with pytest.raises(KeyboardInterrupt):
        main_finetune.run(args_for(workdir, out, '--save_best', epochs=2))
    assert killed
    record = read_checkpoint(str(out / 'checkpoint.pth'))
    best_file = read_checkpoint(str(out / 'checkpoint-best.pth'))
    assert record['best']['test_acc1']['epoch'] == best_file['epoch'] == 0  # the record never ran ahead
    monkeypatch.setattr(util.checkpoint, 'save_atomic', save_atomic)
    main_finetune.run(args_for(workdir, out, '--save_best', '--resume', 'allow', epochs=2))
    log = read_log(out)
    assert [e['epoch'] for e in log] == [0, 1]  # epoch 1's evaluation and line were written on resume
    assert log[-1]['best_test_acc1_epoch'] == 1 == read_checkpoint(str(out / 'checkpoint-best.pth'))['epoch']
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


# ---- a full disk: simulated (any user), and real (a small tmpfs, root) --------------------------------------
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


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / 'small_disk'
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)],
                                           capture_output=True).returncode:
        pytest.skip('needs root to mount a small tmpfs')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_names_the_file_keeps_the_last_checkpoint_and_the_epochs_line(workdir, small_disk, monkeypatch):
    out = small_disk / 'run'
    train = engine_finetune.train_one_epoch

    def train_then_fill_the_disk(*args, **kwargs):
        stats = train(*args, **kwargs)
        if args[2] == 1:  # epoch 1: leave 64 KB, room for a log line, not for a checkpoint
            free = shutil.disk_usage(small_disk).free
            with open(small_disk / 'filler', 'wb') as f:
                f.write(b'\0' * max(free - 64 * 1024, 0))
        return stats

    monkeypatch.setattr(engine_finetune, 'train_one_epoch', train_then_fill_the_disk)
    with pytest.raises(UserError, match=r"cannot write .*checkpoint\.pth: No space left on device\. The previous "
                                        r"checkpoint\.pth .* is intact"):
        main_finetune.run(args_for(workdir, out, '--save_every', '0', epochs=2))
    assert read_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == 0
    assert [e['epoch'] for e in read_log(out)] == [0, 1]  # the failed epoch's training is logged
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]
    os.remove(small_disk / 'filler')
    monkeypatch.setattr(engine_finetune, 'train_one_epoch', train)
    main_finetune.run(args_for(workdir, out, '--save_every', '0', '--resume', 'allow', epochs=2))
    log = read_log(out)
    assert [e['epoch'] for e in log] == [0, 1] and 'test_acc1' in log[1]  # epoch 1 trained again, once


def test_little_free_space_warns_with_the_checkpoint_size(workdir, monkeypatch):
    usage = shutil.disk_usage(str(workdir.root))
    monkeypatch.setattr('util.output.shutil.disk_usage', lambda path: usage._replace(free=1000))
    with pytest.warns(UserWarning, match=r'1000 B free .*checkpoint of about'):
        main_finetune.run(args_for(workdir, workdir.root / 'small_disk', epochs=1))


# ---- a fresh run never replaces another run's files, nor a file it reads ------------------------------------
@pytest.mark.slow
def test_rerun_without_resume_is_refused_where_a_stopped_run_is(workdir, monkeypatch):
    out = workdir.root / 'stopped'
    run_until_stopped(workdir, monkeypatch, out, 8)  # epoch 1, step 2 of 6
    before = snapshot(out)
    no_training(monkeypatch)
    with pytest.raises(UserError, match=r"(?s)holds a run \(checkpoint\.pth, log\.txt; checkpoint\.pth: epoch 1, "
                                        r"step 2, written .*--resume allow.*another --output_dir"):
        main_finetune.run(args_for(workdir, out))  # the same command without --resume, as a requeue sends it
    # a checkpoint of another run resumed into this folder would mix the two runs' files
    other = workdir.root / 'other'
    other.mkdir()
    shutil.copy(out / 'checkpoint.pth', other / 'checkpoint.pth')
    with pytest.raises(UserError, match=r"--resume .*other/checkpoint.pth' continues a run from another folder"):
        main_finetune.run(args_for(workdir, out, '--resume', str(other / 'checkpoint.pth')))
    assert snapshot(out) == before
    monkeypatch.undo()
    main_finetune.run(args_for(workdir, out, '--resume', 'allow'))  # the continuation
    assert [e['epoch'] for e in read_log(out)] == [0, 1]


@pytest.mark.slow
def test_resume_allow_without_checkpoint_pth_names_the_numbered_one(workdir, monkeypatch):
    out = workdir.root / 'numbered_only'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=1))
    os.remove(out / 'checkpoint.pth')
    no_training(monkeypatch)
    with pytest.raises(UserError, match=r"holds a run without checkpoint.pth .*--resume .*checkpoint-0\.pth"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow'))


def test_finetune_from_the_runs_own_numbered_checkpoint_is_refused(workdir):
    out = workdir.root / 'own_source'
    os.makedirs(out)
    shutil.copy(workdir.teacher, out / 'checkpoint-0.pth')
    before = open(out / 'checkpoint-0.pth', 'rb').read()
    with pytest.raises(UserError, match=r"--finetune .*checkpoint-0.pth.* would be overwritten"):
        main_finetune.run(tiny_args(workdir.data, str(out), '--finetune', str(out / 'checkpoint-0.pth'),
                                    '--save_every', '1', epochs=1))
    assert open(out / 'checkpoint-0.pth', 'rb').read() == before


@pytest.mark.slow
def test_finetune_from_the_folders_best_checkpoint_is_refused(workdir):
    out = workdir.root / 'best_source'
    main_finetune.run(args_for(workdir, out, '--save_best', epochs=1))
    before = snapshot(out)
    with pytest.raises(UserError, match=r"--finetune .*checkpoint-best\.pth.* would be overwritten by this run's "
                                        r"checkpoint-best\.pth"):
        main_finetune.run(args_for(workdir, out, '--save_best') + ['--finetune', str(out / 'checkpoint-best.pth')])
    assert snapshot(out) == before


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


# ---- every file the run replaces is checked at start; folders that cannot be written ------------------------
def test_unwritable_output_dir_is_found_before_training(workdir, capsys):
    out = workdir.root / 'readonly'
    if not make_unwritable(out):
        pytest.skip('cannot make a folder unwritable here')
    try:
        with pytest.raises(UserError, match=r"--output_dir .*readonly.* cannot be written"):
            main_finetune.run(args_for(workdir, out, epochs=1))
    finally:
        make_writable(out)
    assert 'Epoch [0]' not in capsys.readouterr().out


@pytest.mark.slow
@ROOT_ONLY
@pytest.mark.parametrize('name', ['checkpoint.pth', 'log.txt'])
def test_an_unreplaceable_file_is_refused_before_training(workdir, monkeypatch, name):
    out = workdir.root / f'immutable_{name}'
    main_finetune.run(args_for(workdir, out, epochs=1))
    no_training(monkeypatch)
    with immutable(out / name), pytest.raises(UserError, match=rf"{name} cannot be replaced by this run: it is "
                                                               r"immutable \(chattr \+i\)"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow', epochs=2))


@pytest.mark.slow
@ROOT_ONLY
def test_eval_into_a_read_only_folder_is_refused_before_evaluating(workdir, monkeypatch):
    source = workdir.root / 'eval_source'
    main_finetune.run(args_for(workdir, source, epochs=1))
    read_only = workdir.root / 'read_only'
    read_only.mkdir()
    monkeypatch.setattr(main_finetune, 'evaluate_only', lambda *a, **k: pytest.fail('evaluated'))
    with immutable(read_only), pytest.raises(UserError, match=r"--output_dir .*read_only' cannot be written"):
        main_finetune.run(['--eval', '--resume', str(source / 'checkpoint.pth'), '--data_path', workdir.data,
                           '--device', 'cpu', '--num_workers', '0', '--output_dir', str(read_only)])


@ROOT_ONLY
def test_unwritable_job_dir_is_refused_before_submission(workdir, tmp_path, monkeypatch):
    locked = tmp_path / 'locked'
    locked.mkdir()
    monkeypatch.setattr(submitit_finetune, 'build_executor', lambda *a: pytest.fail('submitted'))
    argv = args_for(workdir, '', epochs=1)
    i = argv.index('--output_dir')
    del argv[i:i + 4]
    with immutable(locked), pytest.raises(UserError, match=r"--job_dir .*locked' cannot be written"):
        submitit_finetune.main(['--job_dir', str(locked / 'job_%j'), '--cluster', 'debug', *argv])


# ---- stale temporary files ----------------------------------------------------------------------------------
def test_stale_temporaries_of_the_run_are_removed_at_start(workdir, capsys):
    out = workdir.root / 'stale'
    os.makedirs(out)
    (out / 'checkpoint.pth.k2j4h1x9.tmp').write_bytes(b'x' * 1000)
    (out / 'checkpoint-3.pth.abcdefgh.tmp').write_bytes(b'x')
    (out / 'notes.tmp').write_bytes(b'mine')
    main_finetune.run(args_for(workdir, out, epochs=1))
    assert sorted(p.name for p in out.glob('*.tmp')) == ['notes.tmp']
    assert 'removed 2 stale temporary files' in capsys.readouterr().out


def test_stale_temporaries_of_every_run_file_are_removed(tmp_path):
    names = ['checkpoint.pth.a1.tmp', 'checkpoint-3.pth.b2.tmp', 'checkpoint-best.pth.c3.tmp', 'log.txt.d4.tmp',
             'eval_results.json.e5.tmp', 'notes.txt.f6.tmp', 'data.tmp']
    for name in names:
        (tmp_path / name).write_bytes(b'x')
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['data.tmp', 'notes.txt.f6.tmp']


# ---- two runs in one output folder: the lock ----------------------------------------------------------------
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


def test_an_empty_lock_is_taken_over_only_when_old(tmp_path, capsys):
    lock = tmp_path / 'run.lock'
    lock.write_text('')
    with pytest.raises(UserError, match=r"run.lock is empty; another run is creating it right now"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - EMPTY_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    taken = RunLock(str(tmp_path))
    taken.acquire()
    assert 'taking over the empty lock' in capsys.readouterr().out
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    taken.release()


# ---- a mid-epoch checkpoint continues only the same permutation ---------------------------------------------
@pytest.fixture(scope='module')
def stopped_mid_epoch(workdir):
    out = workdir.root / 'mid_epoch'
    run_until_stopped(workdir, pytest.MonkeyPatch(), out, 6 + 2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize('change', ['seed', 'data'])
def test_mid_epoch_resume_with_another_seed_or_data_is_refused(workdir, stopped_mid_epoch, monkeypatch, change):
    out = workdir.root / f'mid_{change}'
    shutil.copytree(stopped_mid_epoch, out)
    argv = args_for(workdir, out, '--resume', 'allow')
    if change == 'seed':
        argv += ['--seed', '1']
        expected = r"--seed 0 then, 1 now"
    else:
        data = workdir.root / 'data_changed'
        shutil.copytree(workdir.data, data)
        first = sorted(os.listdir(data / 'train' / 'class_0'))[0]
        os.rename(data / 'train' / 'class_0' / first, data / 'train' / 'class_0' / ('z' + first))
        argv[argv.index('--data_path') + 1] = str(data)
        expected = r"the training set: 48 images then, 48 now \(same count, other files\)"
    no_training(monkeypatch)
    with pytest.raises(UserError, match=rf"(?s)stopped inside epoch 1.*{expected}.*end-of-epoch checkpoint"):
        main_finetune.run(argv)


@pytest.mark.slow
def test_mid_epoch_resume_of_a_moved_copy_of_the_same_data_continues(workdir, stopped_mid_epoch):
    out = workdir.root / 'mid_moved'
    shutil.copytree(stopped_mid_epoch, out)
    moved = workdir.root / 'data_moved'
    shutil.copytree(workdir.data, moved)
    argv = args_for(workdir, out, '--resume', 'allow')
    argv[argv.index('--data_path') + 1] = str(moved)
    main_finetune.run(argv)
    assert [e['epoch'] for e in read_log(out)] == [0, 1]


# ---- a truncated checkpoint, a cache beside a read-only selection, a requeue --------------------------------
@pytest.mark.slow
def test_a_truncated_checkpoint_names_the_intact_numbered_one(workdir):
    out = workdir.root / 'truncated'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=2))
    data = open(out / 'checkpoint.pth', 'rb').read()
    open(out / 'checkpoint.pth', 'wb').write(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"(?s)cannot read it .*Its folder holds .*checkpoint-1\.pth \(end of epoch "
                                        r"1\), which reads: resume from it with --resume .*checkpoint-1\.pth"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow', epochs=3))


@ROOT_ONLY
def test_class_weight_cache_beside_a_read_only_selection_warns_and_goes_on(tmp_path):
    teacher_path = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': TINY_ARCH, 'nb_classes': 3, 'input_size': 32,
                    'global_pool': True, 'mode': 'none'}
    torch.save(ckpt, teacher_path)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=3, train_per_class=4, val_per_class=0)
    folder = tmp_path / 'selection'
    folder.mkdir()
    selection = str(folder / 'selection.pth')
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', selection, '--num_select', '6',
         '--batch_size', '4', '--num_workers', '0', '--device', 'cpu'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        select_wild_data.main(args)
        teacher = select_wild_data.build_teacher(*select_wild_data.resolve(args))
    with immutable(folder), pytest.warns(UserWarning, match='class weights not cached'):
        weights = training_class_weights(teacher, selection, teacher_path, 32, 0.5, 0, 4, 'cpu')
    assert weights.shape == (3,) and weights.sum().item() == pytest.approx(3.0)


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


# ---- probe mode: the epochs it derives decide when a resumed run is finished --------------------------------
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


# ---- the probe entry point (DFND_DeiT-train.py): a rerun after a stop, and the stop itself ------------------
def test_dfnd_rerun_into_a_stopped_students_folder_is_refused_before_the_selection(tmp_path, monkeypatch):
    import string

    from test_reference_probe import REFERENCE_LINES, load_dfnd, reference_layout

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

    from test_reference_probe import REFERENCE_LINES, load_dfnd, reference_layout

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


# ---- forks, records and locks -----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def finished_numbered(workdir):
    """A finished 2-epoch run keeping checkpoint-0.pth and checkpoint-1.pth."""
    out = workdir.root / 'finished_numbered'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=2))
    return out


def started(monkeypatch):
    """Training raises Started instead of training: the run got past every start-up check."""
    class Started(Exception):
        pass

    def start(*a, **k):
        raise Started

    monkeypatch.setattr(engine_finetune, 'train_one_epoch', start)
    return Started


def test_resuming_an_earlier_checkpoint_into_its_own_folder_is_refused_before_replacing(workdir, finished_numbered,
                                                                                        monkeypatch):
    out = finished_numbered
    before = snapshot(out)
    no_training(monkeypatch)
    with pytest.raises(UserError, match=r"(?s)--resume .*checkpoint-0\.pth' \(end of epoch 0\) is an earlier "
                                        r"checkpoint of the run .*checkpoint\.pth is further on \(end of epoch 1\)"
                                        r".*another --output_dir"):
        main_finetune.run(args_for(workdir, out, '--resume', str(out / 'checkpoint-0.pth'), '--lr', '1e-4'))
    assert snapshot(out) == before
    # branching off it into another folder keeps the run
    branch = workdir.root / 'branch_of_finished'
    Started = started(monkeypatch)
    with pytest.raises(Started):
        main_finetune.run(args_for(workdir, branch, '--resume', str(out / 'checkpoint-0.pth'), '--lr', '1e-4'))
    assert snapshot(out) == before


def test_a_log_line_cut_by_a_kill_is_dropped_and_the_next_starts_its_own_line(tmp_path, capsys):
    from types import SimpleNamespace

    from util.output import trim_log, write_log

    log = tmp_path / 'log.txt'
    log.write_text('{"epoch": 0, "train_loss": 1.5}\n{"epoch": 1, "train_lo')  # epoch 1's append was cut
    trim_log(str(tmp_path), 1)  # the run resumes at epoch 1
    assert 'removed its last line, cut off while it was written' in capsys.readouterr().out
    write_log(SimpleNamespace(output_dir=str(tmp_path)), {'epoch': 1, 'train_loss': 1.25})
    assert read_log(tmp_path) == [{'epoch': 0, 'train_loss': 1.5}, {'epoch': 1, 'train_loss': 1.25}]
    # a cut line that trim_log did not see (e.g. a full disk, then the run went on): the next line is its own
    log.write_text('{"epoch": 0}\n{"epo')
    write_log(SimpleNamespace(output_dir=str(tmp_path)), {'epoch': 1})
    assert log.read_text().splitlines() == ['{"epoch": 0}', '{"epo', '{"epoch": 1}']


def test_an_empty_log_txt_is_no_run(workdir, monkeypatch):
    out = workdir.root / 'empty_log'
    out.mkdir()
    (out / 'log.txt').write_text('')  # ... > OUT/log.txt
    Started = started(monkeypatch)
    for resume in ([], ['--resume', 'allow']):
        with pytest.raises(Started):
            main_finetune.run(args_for(workdir, out, *resume))


def test_an_mae_checkpoint_in_the_folder_is_described_not_called_unreadable(workdir, monkeypatch):
    import argparse

    out = workdir.root / 'mae_folder'
    out.mkdir()
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 7, 'scaler': {}, 'args': argparse.Namespace(lr=1e-3)},
               out / 'checkpoint.pth')  # MAE's main_finetune.py writes its args as a Namespace
    no_training(monkeypatch)
    with pytest.raises(UserError, match=r"holds a run \(checkpoint\.pth; checkpoint\.pth: end of epoch 7, written"):
        main_finetune.run(args_for(workdir, out))


@ROOT_ONLY
def test_an_immutable_numbered_checkpoint_of_an_earlier_epoch_is_no_obstacle(workdir, finished_numbered):
    out = workdir.root / 'continued_past_immutable'
    shutil.copytree(finished_numbered, out)
    with immutable(out / 'checkpoint-0.pth'):  # an epoch the continued run never writes again
        main_finetune.run(args_for(workdir, out, '--save_every', '1', '--resume', 'allow', epochs=3))
    assert [e['epoch'] for e in read_log(out)] == [0, 1, 2]
    assert read_checkpoint(str(out / 'checkpoint-2.pth'))['epoch'] == 2
    os.remove(out / 'checkpoint.pth')  # back to epoch 1 deliberately: epoch 2's checkpoint would be rewritten
    with immutable(out / 'checkpoint-2.pth'), pytest.raises(UserError, match=r"checkpoint-2\.pth cannot be replaced"):
        main_finetune.run(args_for(workdir, out, '--save_every', '1', '--resume', str(out / 'checkpoint-1.pth'),
                                   epochs=3))  # would rewrite epoch 2: refused as before


def test_a_lock_that_is_a_folder_or_cannot_be_removed_is_one_error(tmp_path):
    folder_lock = tmp_path / 'a'
    (folder_lock / 'run.lock').mkdir(parents=True)
    with pytest.raises(UserError, match=r"run\.lock is not a lock file of this project \(a folder\).*remove it"):
        RunLock(str(folder_lock)).acquire()
    stale = tmp_path / 'b'
    stale.mkdir()
    dead = subprocess.Popen(['true'])
    dead.wait()
    (stale / 'run.lock').write_text(json.dumps({'host': __import__('socket').gethostname(), 'pid': dead.pid,
                                                'job_id': None}))
    if os.geteuid() == 0:
        context = immutable(stale)
    else:
        stale.chmod(0o555)
        context = contextlib.nullcontext()
    try:
        with context, pytest.raises(UserError, match=r"cannot remove the stale lock of pid \d+ .*\(Operation not "
                                                     r"permitted|Permission denied\): delete .*run\.lock yourself"):
            RunLock(str(stale)).acquire()
    finally:
        stale.chmod(0o755)


# ---- probe data: a moved target task, a moved wild folder ---------------------------------------------------
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


def test_a_moved_wild_folder_is_refused_at_start(tmp_path, monkeypatch):
    target = make_image_folder(str(tmp_path / 'target'), classes=3, train_per_class=2, val_per_class=2)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=2, train_per_class=4, val_per_class=0)
    paths = sorted(os.path.relpath(os.path.join(d, f), wild) for d, _, fs in os.walk(wild) for f in fs)
    selection = str(tmp_path / 'selection.pth')
    torch.save({'root': wild, 'paths': paths, 'selected': torch.arange(8), 'nb_classes': 3, 'ranking': 'output'},
               selection)
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))
    argv = ['--mode', 'probe', '--finetune', teacher, '--selection', selection, '--eval_data_path', target,
            '--model', 'vit_base_patch16_224', '--model_kwargs', 'patch_size=8', 'embed_dim=48', 'depth=4',
            'num_heads=3', '--input_size', '32', '--nb_classes', '3', '--batch_size', '8', '--teacher_acc', '0.9',
            '--num_workers', '0', '--device', 'cpu', '--output_dir', str(tmp_path / 'probe'), '--epochs', '1']
    no_training(monkeypatch)
    os.rename(wild, tmp_path / 'wild_moved')
    with pytest.raises(UserError, match=r"--selection .*selection\.pth: its wild image folder .*wild' no longer "
                                        r"exists"):
        main_finetune.run(argv)
    os.rename(tmp_path / 'wild_moved', wild)
    os.remove(os.path.join(wild, paths[3]))
    with pytest.raises(UserError, match=r"1 of 8 kept images checked are missing from its wild image folder"):
        main_finetune.run(argv)
    # one that goes missing during training is reported as missing, not as undecodable
    from util.selection import ImageFiles
    with pytest.warns(UserWarning, match=r"skipping missing image .*: FileNotFoundError"):
        assert ImageFiles(wild, [paths[3]])[0] is None
