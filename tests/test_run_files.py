"""The run folder has one owner: what a run writes into its output folder (checkpoints, checkpoint-best.pth,
log.txt, eval_results.json, run.lock, temporaries), and when it refuses to.

- Logs and records: --log_dir following --output_dir, checkpoint-best.pth (--save_best), the best and final
  accuracy in log.txt (strict JSON), a log line cut by a kill.
- Checkpoints: periodic ones inside an epoch, written atomically (a kill or a full disk mid-write keeps the
  previous one) with the umask's permissions; a best checkpoint written before the record that points at it.
- Refusals, answered before any work with one error line: a run never replaces another run's files or a file
  it reads, every file it will replace is checked at start, folders that cannot be written, an --output_dir
  that is a file, two runs in one folder (the lock).
- Housekeeping: stale temporary files, little free space.

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

import pytest
import torch
from helpers import (
    ROOT,
    ROOT_ONLY,
    args_for,
    immutable,
    make_unwritable,
    make_writable,
    no_training,
    read_log,
    run_until_stopped,
    tiny_args,
    user_error,
)

import engine_finetune
import main_finetune
import util.checkpoint
from util.errors import UserError
from util.output import (
    EMPTY_LOCK_SECONDS,
    BestAccuracy,
    RunFolder,
    RunLock,
    check_inputs_not_overwritten,
    remove_stale_temporaries,
    save_atomic,
    write_log,
)
from util.pretrained import read_checkpoint


def snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))
            if not name.startswith('events.out')}


def started(monkeypatch):
    """Training raises Started instead of training: the run got past every start-up check."""
    class Started(Exception):
        pass

    def start(*a, **k):
        raise Started

    monkeypatch.setattr(engine_finetune, 'train_one_epoch', start)
    return Started


# ---- logs, and the best and final accuracy -------------------------------------------------------------------------
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
    write_log(str(tmp_path), {'epoch': 0, 'test_loss': float('inf'), 'train_loss': float('nan'), 'x': 1.5})
    assert read_log(str(tmp_path)) == [{'epoch': 0, 'test_loss': None, 'train_loss': None, 'x': 1.5}]


def test_a_log_line_cut_by_a_kill_is_dropped_and_the_next_starts_its_own_line(tmp_path, capsys):

    from util.output import trim_log, write_log

    log = tmp_path / 'log.txt'
    log.write_text('{"epoch": 0, "train_loss": 1.5}\n{"epoch": 1, "train_lo')  # epoch 1's append was cut
    trim_log(str(tmp_path), 1)  # the run resumes at epoch 1
    assert 'removed its last line, cut off while it was written' in capsys.readouterr().out
    write_log(str(tmp_path), {'epoch': 1, 'train_loss': 1.25})
    assert read_log(tmp_path) == [{'epoch': 0, 'train_loss': 1.5}, {'epoch': 1, 'train_loss': 1.25}]
    # a cut line that trim_log did not see (e.g. a full disk, then the run went on): the next line is its own
    log.write_text('{"epoch": 0}\n{"epo')
    write_log(str(tmp_path), {'epoch': 1})
    assert log.read_text().splitlines() == ['{"epoch": 0}', '{"epo', '{"epoch": 1}']


# ---- checkpoints: periodic, atomic, with the umask's permissions ---------------------------------------------------
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


# ---- the best checkpoint before the record that points at it -------------------------------------------------------
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


# ---- a full disk: simulated (any user), and real (a small tmpfs, root) ---------------------------------------------
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


# ---- a fresh run never replaces another run's files, nor a file it reads -------------------------------------------
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
    folder = RunFolder(out, save_every=5)
    check_inputs_not_overwritten(folder, {}, start_epoch=0)
    # the run's own checkpoint.pth is what a resumed run continues: allowed
    check_inputs_not_overwritten(folder, {'resume': f'{out}/checkpoint.pth'}, start_epoch=3)
    # an older numbered checkpoint that this run will not write again: allowed
    check_inputs_not_overwritten(folder, {'resume': f'{out}/checkpoint-4.pth'}, start_epoch=5)
    for flag, name in (('resume', 'checkpoint-9.pth'), ('selection', 'log.txt'), ('finetune', 'checkpoint.pth')):
        with pytest.raises(UserError, match=rf"--{flag} .*{name}.* would be overwritten"):
            check_inputs_not_overwritten(folder, {flag: f'{out}/{name}'}, start_epoch=5)


@pytest.fixture(scope='module')
def finished_numbered(workdir):
    """A finished 2-epoch run keeping checkpoint-0.pth and checkpoint-1.pth."""
    out = workdir.root / 'finished_numbered'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=2))
    return out


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


def test_output_dir_that_is_a_file(small_work):
    path = small_work.root / 'a_file'
    path.write_text('keep me')
    message = user_error(tiny_args(small_work.data, str(path)))
    assert '--output_dir' in message and str(path) in message
    assert path.read_text() == 'keep me'


# ---- every file the run replaces is checked at start; folders that cannot be written -------------------------------
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


# ---- stale temporary files -----------------------------------------------------------------------------------------
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


# ---- two runs in one output folder: the lock -----------------------------------------------------------------------
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
