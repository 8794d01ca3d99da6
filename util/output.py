"""The run's output folder: the one owner of every file a run writes there.

    checkpoint.pth          the latest state (end of epoch, or mid-epoch every --checkpoint_minutes)
    checkpoint-<epoch>.pth  kept every --save_every epochs and at the end
    checkpoint-best.pth     the best epoch's state (--save_best)
    log.txt                 one JSON line per epoch, with the best accuracies so far
    eval_results.json       --eval's results
    run.lock                the host, pid and SLURM job of the run using the folder
    <file>.<random>.tmp     a write in progress (removed at start when a killed write left one)
    events.out.tfevents.*   TensorBoard (in --log_dir, by default the same folder)

At start it decides, once, what the run is: a fresh run into a folder that holds no run, the
continuation of the run there (a checkpoint of the folder resumed, e.g. --resume allow), or a refusal
that says what is there and the two ways on. It checks that the folder can be written, that every
existing file the run will replace can be replaced, that no input flag names a file the run writes,
and that there is room for a checkpoint. Rank 0 owns the folder (it alone writes); these run there.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from util.checkpoint import (
    BEST,
    CHECKPOINT,
    EVAL_RESULTS,
    LOCK,
    LOG,
    NUMBERED,
    atomic_write_text,
    end_of_epoch_stats,
    next_position,
    saved_position,
    stale_temporaries,
)
from util.distributed import broadcast_object, is_main_process, log
from util.errors import UserError

# Flags naming files a run reads; none of them may be a file the run writes.
INPUT_FLAGS = ('finetune', 'resume', 'ensemble_with', 'selection')


@contextmanager
def output_dir_in_use(args) -> Iterator[None]:
    """Check that the output folder can be written (and its existing files replaced) before training, hold
    its lock for the run, and clear the temporaries of killed writes. Rank 0 checks; every rank raises the
    same error."""
    lock, error = None, None
    if is_main_process() and args.output_dir:
        try:
            check_writable(args.output_dir, '--output_dir')
            if not args.eval:  # evaluation writes eval_results.json alone
                if args.log_dir:
                    check_writable(args.log_dir, '--log_dir')
                lock = RunLock(args.output_dir)
                lock.acquire()
                remove_stale_temporaries(args.output_dir)
                check_replaceable(args.output_dir)
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


def writes(args, path: str, start_epoch: int) -> bool:
    """Whether a training run from ``start_epoch`` on writes ``path``: checkpoint.pth, log.txt, run.lock,
    checkpoint-best.pth (--save_best) and checkpoint-<epoch>.pth of any epoch from ``start_epoch`` on (the
    epochs a mode derives are not known yet: every later one counts) in --output_dir."""
    folder = os.path.realpath(args.output_dir)
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != folder:
        return False
    name = os.path.basename(path)
    numbered = NUMBERED.fullmatch(name)
    if numbered:
        return int(numbered.group(1)) >= start_epoch and bool(args.save_every)
    return name in (CHECKPOINT, LOG, LOCK) or (name == BEST and bool(args.save_best))


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # also through hard links and symlinks
    return os.path.realpath(a) == os.path.realpath(b)


def check_inputs_not_overwritten(args, start_epoch: int) -> None:
    """Refuse a run whose outputs would replace a file it reads (e.g. --finetune OUT/checkpoint-0.pth).

    The one exception is the run's own checkpoint.pth given to --resume: continuing it is resuming."""
    if args.eval or not args.output_dir:
        return  # evaluation writes nothing the run reads
    own = os.path.join(args.output_dir, CHECKPOINT)
    for flag in INPUT_FLAGS:
        path = getattr(args, flag, '') or ''
        if not path or (flag == 'resume' and (path == 'allow' or _same_file(path, own))):
            continue
        real = os.path.realpath(path)  # through a link to the file, the file the run would replace
        if writes(args, path, start_epoch) or (os.path.exists(path) and writes(args, real, start_epoch)):
            raise UserError(f"--{flag} {path!r} would be overwritten by this run's {os.path.basename(real)} "
                            f"in --output_dir {args.output_dir!r}. Give the run another --output_dir, or copy "
                            "the file out of it first.")


def run_files(output_dir: str) -> list[str]:
    """The files in ``output_dir`` that show a training run was there: its checkpoints and log.txt."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(e for e in os.listdir(output_dir) if e in (CHECKPOINT, BEST, LOG) or NUMBERED.fullmatch(e))


def describe_run(output_dir: str) -> str:
    """What the run in ``output_dir`` left: its latest checkpoint's position and when it was written."""
    files = run_files(output_dir)
    latest = os.path.join(output_dir, CHECKPOINT)
    what = ', '.join(files[:6]) + (f' and {len(files) - 6} more' if len(files) > 6 else '')
    if os.path.isfile(latest):
        when = datetime.datetime.fromtimestamp(os.path.getmtime(latest)).isoformat(sep=' ', timespec='minutes')
        try:
            epoch, step = saved_position(torch.load(latest, map_location='cpu', mmap=True, weights_only=True))
            where = f"end of epoch {epoch}" if step is None else f"epoch {epoch}, step {step}"
        except Exception:  # any unreadable file: its position is unknown, its presence is what matters
            where = 'unreadable'
        return f"{what}; checkpoint.pth: {where}, written {when}"
    return what


def check_run_folder(args, resume_from: str | None) -> None:
    """Decide what this run is in --output_dir: a fresh run (the folder holds no run), the continuation of the
    run there (``resume_from`` is one of the folder's own checkpoints), or a refusal that names what is there
    and the two ways on. Evaluation writes only eval_results.json and is never refused."""
    out = args.output_dir
    if args.eval or not out:
        return
    present = run_files(out)
    if not present:
        return
    if resume_from and os.path.realpath(os.path.dirname(os.path.abspath(resume_from))) == os.path.realpath(out):
        return
    here = describe_run(out)
    if args.resume == 'allow':  # no checkpoint.pth, but other files of a run
        numbered = sorted((int(NUMBERED.fullmatch(f).group(1)), f) for f in present if NUMBERED.fullmatch(f))
        hint = (f"continue from its last numbered checkpoint with --resume {os.path.join(out, numbered[-1][1])}"
                if numbered else "continue it from one of its checkpoints with --resume PATH")
        raise UserError(f"--resume allow: --output_dir {out!r} holds a run without checkpoint.pth ({here}); a "
                        f"fresh run would replace its files. {hint[0].upper() + hint[1:]}, or give this run "
                        "another --output_dir.")
    source = (f"--resume {args.resume!r} continues a run from another folder, but " if args.resume else '')
    raise UserError(f"{source}--output_dir {out!r} holds a run ({here}), whose files this run would replace. "
                    "Continue that run with --resume allow, or give this run another --output_dir.")


# ioctl(FS_IOC_GETFLAGS) and its immutable / append-only bits (linux/fs.h)
_FS_IOC_GETFLAGS, _FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x80086601, 0x10, 0x20


def _replace_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be replaced by a rename (or appended to), or None: an immutable or append-only file,
    a file of another user in a sticky folder, a folder this user cannot write."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        import fcntl

        with open(path, 'rb') as f:
            buf = bytearray(8)
            fcntl.ioctl(f.fileno(), _FS_IOC_GETFLAGS, buf)
        flags = int.from_bytes(buf[:4], 'little')
        if flags & _FS_IMMUTABLE_FL:
            return 'it is immutable (chattr +i): remove the flag with chattr -i'
        if flags & _FS_APPEND_FL:
            return 'it is append-only (chattr +a): remove the flag with chattr -a'
    except (OSError, ImportError):  # a filesystem without these flags, or no fcntl: nothing to learn here
        pass
    euid = os.geteuid() if hasattr(os, 'geteuid') else None
    st, st_dir = os.stat(path), os.stat(folder)
    if euid not in (None, 0) and st_dir.st_mode & stat.S_ISVTX and euid not in (st.st_uid, st_dir.st_uid):
        return (f"it belongs to user id {st.st_uid} in a folder with the sticky bit, where only its owner can "
                "replace it")
    if not os.access(folder, os.W_OK):
        return 'its folder cannot be written'
    if os.path.basename(path) == LOG and not os.access(path, os.W_OK):
        return 'it cannot be written (permissions)'
    return None


def check_replaceable(output_dir: str) -> None:
    """Every existing file of the folder a training run writes again must be replaceable, so that the run does
    not train until its first save and fail there."""
    for name in run_files(output_dir):
        problem = _replace_problem(os.path.join(output_dir, name))
        if problem:
            raise UserError(f"{os.path.join(output_dir, name)} cannot be replaced by this run: {problem}; or give "
                            "this run another --output_dir.")


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


# An empty run.lock older than this was left by a run that died while creating it.
EMPTY_LOCK_SECONDS = 30


class RunLock:
    """``output_dir/run.lock``, holding the host, pid and SLURM job id of the run using the folder.

    A second run in the same folder would silently resume (and overwrite) the first one's checkpoint,
    so it is refused. A lock is stale, and taken over with a line saying so, when its process is gone
    (same host) or when it belongs to this very SLURM job (a requeued job finds its own lock). The lock
    of another host cannot be checked: the message says how to remove it."""

    NAME = LOCK

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
        if not owner:  # a lock is written the instant it is created: an empty one is its creator's crash
            try:
                age = datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
            except OSError:
                return None
            return f"empty lock, {age:.0f} s old (its run died while creating it)" if age > EMPTY_LOCK_SECONDS else None
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
        if not owner:
            return (f"--output_dir {folder!r}: {self.path} is empty; another run is creating it right now. Give "
                    f"this run another --output_dir, or try again in {EMPTY_LOCK_SECONDS} s (an empty lock older "
                    "than that is taken over).")
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}"
               + (f" (SLURM job {owner['job_id']})" if owner.get('job_id') else '')
               + (f", since {owner['started']}" if owner.get('started') else ''))
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
    atomic_write_text(json.dumps(record, indent=1), path)
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
        with open(os.path.join(args.output_dir, LOG), 'a', encoding='utf-8') as f:
            f.write(json.dumps(finite, allow_nan=False) + '\n')


def _epoch_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)['epoch'])
    except (ValueError, KeyError, TypeError):
        return None  # not a line of this project's


def logged_epochs(output_dir: str) -> set[int]:
    """The epochs log.txt has a line for."""
    path = os.path.join(output_dir, LOG) if output_dir else ''
    if not path or not os.path.isfile(path):
        return set()
    with open(path, encoding='utf-8') as f:
        return {e for e in map(_epoch_of, f) if e is not None}


def trim_log(output_dir: str, start_epoch: int) -> None:
    """A resumed run continues log.txt from its checkpoint: lines of epochs from ``start_epoch`` on were written
    after that checkpoint (by a run that stopped, or failed to save) and are trained again, so they go."""
    path = os.path.join(output_dir, LOG)
    if not output_dir or not is_main_process() or not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept = [line for line in lines if (_epoch_of(line) is None or _epoch_of(line) < start_epoch)]
    if len(kept) < len(lines):
        atomic_write_text(''.join(kept), path)
        log(f"log.txt: removed {len(lines) - len(kept)} line(s) of epochs >= {start_epoch}, written after the "
            "resumed checkpoint (those epochs are trained again)")


def epoch_end_missing(ckpt: dict | None, ckpt_path: str | None, output_dir: str) -> bool:
    """Whether the run folder's own end-of-epoch checkpoint lacks its epoch's evaluation and log.txt line (a stop
    or a kill between the two): the resumed run writes them first."""
    return (end_of_epoch_stats(ckpt) is not None and bool(output_dir) and os.path.isdir(output_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), output_dir)
            and saved_position(ckpt)[0] not in logged_epochs(output_dir))


def finished(ckpt: dict | None, ckpt_path: str | None, epochs: int | None, output_dir: str) -> bool:
    """Whether the resumed run has trained all ``epochs`` and written their ends (a finished run resumed again,
    e.g. --resume allow in a requeued job, is not an error: it says so)."""
    if ckpt is None or epochs is None or next_position(ckpt)[0] < epochs \
            or epoch_end_missing(ckpt, ckpt_path, output_dir):
        return False
    log(f"nothing to do: {ckpt_path} has finished epoch {next_position(ckpt)[0] - 1}, the last of {epochs} "
        "epochs; to train longer raise --epochs, to evaluate add --eval")
    return True


def open_log_writer(args, position: int) -> SummaryWriter | None:
    """TensorBoard events in --log_dir on rank 0; points up to the resumed ``position`` (epoch_1000x, as the
    engine writes them) were trained and are kept, later ones (a stopped run's) are purged."""
    if not is_main_process():
        return None
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    if not args.log_dir:
        return None
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir, purge_step=position + 1 if position else None)
