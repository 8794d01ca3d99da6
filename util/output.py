"""The run's output folder: checked before training starts (writable, big enough, not one of the run's
inputs, not in use by another run (a lock file), free of the temporaries of killed writes), and the
records written into it: log.txt (one JSON line per epoch, with the best accuracies so far) and
eval_results.json (--eval).

Rank 0 owns the folder (it alone writes checkpoints and log.txt); these run there.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from util.checkpoint import stale_temporaries
from util.distributed import broadcast_object, is_main_process, log
from util.errors import UserError

EVAL_RESULTS = 'eval_results.json'
# Flags naming files a run reads; none of them may be a file the run writes.
INPUT_FLAGS = ('finetune', 'resume', 'ensemble_with', 'selection')


@contextmanager
def output_dir_in_use(args) -> Iterator[None]:
    """Check that the output folder can be written before training, hold its lock for the run, and
    clear the temporaries of killed writes. Rank 0 checks; every rank raises the same error."""
    lock, error = None, None
    if is_main_process() and args.output_dir and not args.eval:
        try:
            check_writable(args.output_dir, '--output_dir')
            if args.log_dir:
                check_writable(args.log_dir, '--log_dir')
            lock = RunLock(args.output_dir)
            lock.acquire()
            remove_stale_temporaries(args.output_dir)
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_output_folders(args) -> None:
    """--output_dir / --log_dir must be folders, or paths where one can be created."""
    for flag in ('output_dir', 'log_dir'):
        folder = getattr(args, flag)
        existing = os.path.abspath(folder) if folder else ''
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing and not os.path.isdir(existing):
            what = 'is a file' if existing == os.path.abspath(folder) else f'lies under the file {existing!r}'
            raise UserError(f"--{flag} {folder!r} {what}, not a folder: give a folder path (it is created if "
                            "missing)")


def check_writable(folder: str, flag: str) -> None:
    """Create ``folder`` and write a file into it now, instead of failing at the first checkpoint."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test-'):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder!r} cannot be written: {e.strerror or e}. Give a folder this user can "
                        "create files in (checkpoints, log.txt and TensorBoard events go there).") from e


def checkpoint_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """About the size of one checkpoint: the saved modules' tensors and the optimizer's state
    (AdamW: two moments per trained parameter)."""
    size = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    trained = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g['params'])
    return size + 2 * trained


def warn_if_little_space(output_dir: str, one_checkpoint: int, keeps_numbered: bool) -> None:
    """Warn when the free space cannot hold what the run writes at once: checkpoint.pth, its temporary
    copy during a write, and a numbered checkpoint."""
    needed = one_checkpoint * (3 if keeps_numbered else 2)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        warnings.warn(f"--output_dir {output_dir!r} has {_size(free)} free but a checkpoint of about "
                      f"{_size(one_checkpoint)} needs {_size(needed)} (the file, its temporary copy during a write"
                      + (", a numbered checkpoint" if keeps_numbered else '') + "); saves may fail with "
                      "'No space left on device'. Free space or choose another --output_dir.", UserWarning,
                      stacklevel=2)


def _size(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f"{n:.0f} {unit}" if unit == 'B' else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def written_files(args, start_epoch: int) -> list[str]:
    """Every file a training run writes in its output folder, from ``start_epoch`` on."""
    out = args.output_dir
    files = [os.path.join(out, name) for name in ('checkpoint.pth', 'log.txt', RunLock.NAME)]
    if args.save_every:
        files += [os.path.join(out, f'checkpoint-{e}.pth') for e in range(start_epoch, args.epochs)
                  if (e + 1) % args.save_every == 0 or e + 1 == args.epochs]
    return files


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # also through hard links and symlinks
    return os.path.realpath(a) == os.path.realpath(b)


def check_inputs_not_overwritten(args, start_epoch: int) -> None:
    """Refuse a run whose outputs would replace a file it reads (e.g. --finetune OUT/checkpoint-0.pth).

    The one exception is the run's own checkpoint.pth given to --resume: continuing it is resuming."""
    if args.eval or not args.output_dir:
        return  # evaluation writes nothing
    own = os.path.join(args.output_dir, 'checkpoint.pth')
    outputs = written_files(args, start_epoch)
    for flag in INPUT_FLAGS:
        path = getattr(args, flag, '') or ''
        if not path or (flag == 'resume' and (path == 'allow' or _same_file(path, own))):
            continue
        for output in outputs:
            if _same_file(path, output):
                raise UserError(f"--{flag} {path!r} would be overwritten by this run's {os.path.basename(output)} "
                                f"in --output_dir {args.output_dir!r}. Give the run another --output_dir, or copy "
                                "the file out of it first.")


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete the temporary files that killed checkpoint writes of this run left (each up to a checkpoint).

    Called with the folder's lock held: no live run of this folder is writing them."""
    stale = stale_temporaries(output_dir)
    if not stale:
        return
    size = 0
    for path in stale:
        size += os.path.getsize(path)
        os.remove(path)
    log(f"removed {len(stale)} stale temporary files ({_size(size)}) left in {output_dir} by interrupted "
        "checkpoint writes")


class RunLock:
    """``output_dir/run.lock``, holding the host, pid and SLURM job id of the run using the folder.

    A second run in the same folder would silently resume (and overwrite) the first one's checkpoint,
    so it is refused. A lock is stale, and taken over with a line saying so, when its process is gone
    (same host) or when it belongs to this very SLURM job (a requeued job finds its own lock). The lock
    of another host cannot be checked: the message says how to remove it."""

    NAME = 'run.lock'

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, self.NAME)
        self.held = False

    @staticmethod
    def _owner() -> dict:
        return {'host': socket.gethostname(), 'pid': os.getpid(), 'job_id': os.environ.get('SLURM_JOB_ID'),
                'started': datetime.datetime.now().isoformat(timespec='seconds')}

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path, encoding='utf-8') as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: its owner cannot be told

    def _stale_reason(self, owner: dict) -> Optional[str]:
        me = self._owner()
        if owner.get('job_id') and owner.get('job_id') == me['job_id']:
            return f"lock of SLURM job {owner['job_id']} (this job, requeued)"
        if owner.get('host') == me['host'] and isinstance(owner.get('pid'), int):
            if owner['pid'] == me['pid']:
                return f"lock of pid {owner['pid']} (this process)"
            if not _pid_alive(owner['pid']):
                return f"stale lock of pid {owner['pid']} on {owner['host']} (no such process)"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the run that holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released meanwhile
                reason = self._stale_reason(owner)
                if reason is None:
                    raise UserError(self._in_use_message(owner)) from None
                log(f"taking over the {reason}: {self.path}")
                os.remove(self.path)
                continue
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(self._owner(), f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}: another run keeps creating it")

    def _in_use_message(self, owner: dict) -> str:
        folder = os.path.dirname(self.path)
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}"
               + (f" (SLURM job {owner['job_id']})" if owner.get('job_id') else '')
               + (f", since {owner['started']}" if owner.get('started') else '')) if owner else 'an unknown run'
        here = owner.get('host') == socket.gethostname()
        check = ("that process is running" if here else
                 f"this host cannot check whether it is still running; if it is not, delete {self.path}")
        return (f"--output_dir {folder!r} is in use by {who}: {check}. Two runs in one folder would overwrite "
                "each other's checkpoints; give this run another --output_dir, or wait for the other to end.")

    def release(self) -> None:
        if self.held:
            self.held = False
            owner = self._read()
            if owner and owner.get('pid') == os.getpid() and owner.get('host') == socket.gethostname():
                os.remove(self.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def write_eval_results(args, stats: dict, ckpt_path: str | None) -> None:
    """--eval: the results, and what was evaluated, in output_dir/eval_results.json (beside the printed lines)."""
    log(f"evaluation: {json.dumps(stats)}")
    if not args.output_dir or not is_main_process():
        return
    os.makedirs(args.output_dir, exist_ok=True)
    record = {'checkpoint': ckpt_path or args.finetune, 'ensemble_with': args.ensemble_with or None,
              'data_path': args.eval_data_path, 'mean': args.mean, 'std': args.std, **stats}
    path = os.path.join(args.output_dir, EVAL_RESULTS)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)
    os.replace(path + '.tmp', path)
    log(f"evaluation results written to {path}")


class BestAccuracy:
    """Best top-1 so far of the raw and EMA weights, with their epochs; kept in checkpoints so that a resumed
    run continues the same record (--save_best keeps checkpoint-best.pth by the raw or EMA top-1)."""

    KEYS = ('test_acc1', 'ema_test_acc1')

    def __init__(self, state: dict | None = None):
        self.best = dict(state or {})  # key -> {'acc1': value, 'epoch': epoch}

    def update(self, stats: dict, epoch: int) -> list[str]:
        """Record this epoch's accuracies; returns the keys whose best it improved."""
        improved = []
        for key in self.KEYS:
            if key in stats and (key not in self.best or stats[key] > self.best[key]['acc1']):
                self.best[key] = {'acc1': stats[key], 'epoch': epoch}
                improved.append(key)
        return improved

    def log_fields(self) -> dict:
        """best_test_acc1, best_test_acc1_epoch (and the EMA's) for log.txt."""
        out = {}
        for key, record in self.best.items():
            out[f'best_{key}'] = record['acc1']
            out[f'best_{key}_epoch'] = record['epoch']
        return out

    def summary(self, final: dict) -> str:
        parts = []
        for key, name in (('test_acc1', 'raw'), ('ema_test_acc1', 'EMA')):
            if key in self.best:
                parts.append(f"{name}: final {final.get(key, float('nan')):.2f}%, best {self.best[key]['acc1']:.2f}% "
                             f"(epoch {self.best[key]['epoch']})")
        return 'top-1 accuracy ' + '; '.join(parts) if parts else 'no evaluation ran'


def write_log(args, stats: dict) -> None:
    """One JSON line; NaN and infinity (not JSON) are written as null."""
    if args.output_dir and is_main_process():
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
        with open(os.path.join(args.output_dir, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(finite, allow_nan=False) + '\n')
