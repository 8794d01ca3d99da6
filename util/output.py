"""The run's output folder: the one owner of every file a run writes there, and of their names.

    checkpoint.pth          the latest state (end of epoch, or mid-epoch every --checkpoint_minutes)
    checkpoint-<epoch>.pth  kept every --save_every epochs and at the end
    checkpoint-best.pth     the best epoch's state (--save_best)
    log.txt                 one JSON line per epoch, with the best accuracies so far
    eval_results.json       --eval's results
    config.yaml, run_record.json, console.txt   how the run was made (util/run_record.py)
    curves.png              the run's curves from log.txt (util/tracking.py)
    run.lock                the host, pid and SLURM job of the run using the folder
    <file>.<random>.tmp     a write in progress (removed at start when a killed write left one)
    events.out.tfevents.*   TensorBoard (in --log_dir, by default the same folder)

Every file is written atomically (``save_atomic``, ``atomic_write_text``: a temporary beside it, renamed
over it) except log.txt, which is appended to. Before a run trains, this module checks that its folders
can be written (``check_writable``, also the one check of the other tools' output folders), that every
existing file the run will replace can be replaced, that no input flag names a file the run writes, and
that there is room for a checkpoint; it holds the folder's lock. Rank 0 owns the folder (it alone writes).
What a checkpoint holds is util/checkpoint.py's; what a run in a folder is (fresh, a continuation, a
refusal) is decided in util/run_loop.py, which reads checkpoint positions.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from util.distributed import broadcast_object, is_main_process, log
from util.errors import UserError

# The files a run writes in its output folder (the docstring describes each).
CHECKPOINT = 'checkpoint.pth'
BEST = 'checkpoint-best.pth'
LOG = 'log.txt'
EVAL_RESULTS = 'eval_results.json'
LOCK = 'run.lock'
NUMBERED = re.compile(r'checkpoint-(\d+)\.pth')
# Temporary files of save_atomic: '<target name>.<random>.tmp' beside the target (mkstemp's random part
# has no dots).
TMP_SUFFIX = '.tmp'
# the temporaries of every file a run writes with save_atomic / atomic_write_text
_RUN_FILE_TMP = re.compile(r'(checkpoint(-\d+|-best)?\.pth|log\.txt|eval_results\.json|config\.yaml|run_record\.json'
                          r'|curves\.png)\.[^.]+'
                           + re.escape(TMP_SUFFIX))


def numbered(epoch: int) -> str:
    """The name of the checkpoint kept for ``epoch`` (``checkpoint-<epoch>.pth``)."""
    return f'checkpoint-{epoch}.pth'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _RecordingFile:
    """A binary file whose write errors are kept: torch.save turns an OSError of a write (a full disk) into a
    RuntimeError that no longer says which, and this keeps the original to report."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename it over ``path``; on any
    failure the temporary is removed and ``path`` is untouched. A full disk or quota becomes a UserError naming
    the file, also where the writer hides the OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix=TMP_SUFFIX, dir=folder)
    recording = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, 'wb') as f:
            recording = _RecordingFile(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = recording.error if recording is not None and recording.error is not None else e
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot write {path}: {os.strerror(cause.errno)}. The previous "
                            f"{os.path.basename(path)} (if any) is intact; free space in {folder} (or give "
                            "--output_dir on a larger filesystem) and resume with --resume allow") from e
        raise


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, then rename it over ``path``.

    A crash (or a kill) mid-write leaves the previous file untouched and loadable. The file gets the
    permissions of an ordinary new file (0666 minus the umask), not mkstemp's 0600, so colleagues on a
    shared filesystem can read it. A full disk is reported as a UserError naming the file.
    """
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """``text`` (UTF-8) into ``path`` as save_atomic writes checkpoints."""
    _atomic(path, lambda f: f.write(text.encode('utf-8')))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """``data`` into ``path`` as save_atomic writes checkpoints."""
    _atomic(path, lambda f: f.write(data))


def stale_temporaries(folder: str) -> list[str]:
    """The temporary files of a run's writes in ``folder`` (checkpoint.pth.<random>.tmp, of
    checkpoint-<epoch>.pth, checkpoint-best.pth, log.txt, eval_results.json): what killed writes leave."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, e) for e in os.listdir(folder) if _RUN_FILE_TMP.fullmatch(e))


def resume_path(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: ``resume`` itself, or for ``allow`` the run's own
    ``output_dir/checkpoint.pth`` when it exists (else None: start fresh)."""
    if not resume:
        return None
    if resume == 'allow':
        path = os.path.join(output_dir, CHECKPOINT) if output_dir else ''
        return path if path and os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume!r}: no such checkpoint (use --resume allow to start fresh "
                        "when the output directory has none)")
    return resume


# Flags naming files a run reads; none of them may be a file the run writes.
INPUT_FLAGS = ('finetune', 'resume', 'ensemble_with', 'selection')


@dataclass(frozen=True)
class RunFolder:
    """Where a run writes, and which of the output folder's files: --output_dir and --log_dir (resolved), the
    numbered checkpoints of --save_every, checkpoint-best.pth with --save_best; an evaluation (``evaluating``)
    writes eval_results.json alone."""
    output_dir: str
    log_dir: Optional[str] = None
    save_every: int = 0
    save_best: bool = False
    evaluating: bool = False


@contextmanager
def output_dir_in_use(folder: RunFolder, start_epoch: int) -> Iterator[None]:
    """Check that the output folder can be written (and its existing files that a training run from
    ``start_epoch`` replaces can be replaced) before training, hold its lock for the run, and clear the
    temporaries of killed writes. Rank 0 checks; every rank raises the same error."""
    lock, error = None, None
    out, log_dir = folder.output_dir, folder.log_dir
    created = [f for f in (out, log_dir) if f and not os.path.exists(f)] if is_main_process() else []
    if is_main_process() and out:
        try:
            check_writable(out, f"--output_dir {out!r}", RUN_FOLDER_FIX)
            if not folder.evaluating:  # evaluation writes eval_results.json alone
                if log_dir:
                    check_writable(log_dir, f"--log_dir {log_dir!r}", RUN_FOLDER_FIX)
                lock = RunLock(out)
                lock.acquire()
                remove_stale_temporaries(out)
                check_replaceable(folder, start_epoch)
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise UserError(error)
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
        remove_if_empty(created)  # a run refused before it wrote anything leaves no folder behind
        raise
    finally:
        if lock is not None:
            lock.release()


def remove_if_empty(folders: list[str]) -> None:
    """Remove each of ``folders`` (created by this run) that holds nothing."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only an empty folder: anything written stays


def check_output_folders(output_dir: str, log_dir: Optional[str]) -> None:
    """--output_dir / --log_dir must be folders, or paths where one can be created."""
    for flag, folder in (('output_dir', output_dir), ('log_dir', log_dir)):
        if folder:
            _check_is_folder(folder, f"--{flag} {folder!r}", "give a folder path (it is created if missing)")


def _check_is_folder(folder: str, subject: str, fix: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = 'is a file' if existing == os.path.abspath(folder) else f'lies under the file {existing!r}'
        raise UserError(f"{subject} {where}, not a folder: {fix}")


# what to do about a run's folder that cannot be written
RUN_FOLDER_FIX = "give a folder this user can create files in (checkpoints, log.txt and TensorBoard events go there)"


def check_writable(folder: str, subject: str, fix: str) -> None:
    """Create ``folder`` and write a file into it now, instead of failing once the work is done. ``subject``
    names the folder in the message (e.g. "--output_dir 'out'"), ``fix`` says what to give instead."""
    _check_is_folder(folder, subject, fix)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test-'):
            pass
    except OSError as e:
        raise UserError(f"{subject} cannot be written ({e.strerror or e}): {fix}") from e


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


def writes(folder: RunFolder, path: str, start_epoch: int) -> bool:
    """Whether a training run from ``start_epoch`` on writes ``path``: checkpoint.pth, log.txt, run.lock,
    checkpoint-best.pth (--save_best) and checkpoint-<epoch>.pth of any epoch from ``start_epoch`` on (the
    epochs a mode derives are not known yet: every later one counts) in --output_dir."""
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(folder.output_dir):
        return False
    name = os.path.basename(path)
    numbered = NUMBERED.fullmatch(name)
    if numbered:
        return int(numbered.group(1)) >= start_epoch and bool(folder.save_every)
    return name in (CHECKPOINT, LOG, LOCK) or (name == BEST and bool(folder.save_best))


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file (through hard links and symlinks), or would."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # also through hard links and symlinks
    return os.path.realpath(a) == os.path.realpath(b)


def check_inputs_not_overwritten(folder: RunFolder, inputs: dict[str, str], start_epoch: int) -> None:
    """Refuse a run whose outputs would replace a file it reads (``inputs``: the value of each of INPUT_FLAGS the
    run has, e.g. --finetune OUT/checkpoint-0.pth).

    The one exception is the run's own checkpoint.pth given to --resume: continuing it is resuming."""
    if folder.evaluating or not folder.output_dir:
        return  # evaluation writes nothing the run reads
    own = os.path.join(folder.output_dir, CHECKPOINT)
    for flag in INPUT_FLAGS:
        path = inputs.get(flag) or ''
        if not path or (flag == 'resume' and (path == 'allow' or same_path(path, own))):
            continue
        real = os.path.realpath(path)  # through a link to the file, the file the run would replace
        if writes(folder, path, start_epoch) or (os.path.exists(path) and writes(folder, real, start_epoch)):
            raise UserError(f"--{flag} {path!r} would be overwritten by this run's {os.path.basename(real)} "
                            f"in --output_dir {folder.output_dir!r}. Give the run another --output_dir, or copy "
                            "the file out of it first.")


def run_files(output_dir: str) -> list[str]:
    """The files in ``output_dir`` that show a training run was there: its checkpoints and log.txt."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = sorted(e for e in os.listdir(output_dir) if e in (CHECKPOINT, BEST, LOG) or NUMBERED.fullmatch(e))
    # an empty log.txt (e.g. created by a shell redirection) records no epoch: no run was there
    return [e for e in found if not (e == LOG and _empty_file(os.path.join(output_dir, e)))]


def _empty_file(path: str) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == 0
    except OSError:
        return False


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job (preemption, time-out, node failure); 0 outside SLURM."""
    if not os.environ.get('SLURM_JOB_ID'):
        return 0
    try:
        return int(os.environ.get('SLURM_RESTART_COUNT', '0') or 0)
    except ValueError:
        return 0


def requeued_checkpoint(output_dir: str, resume: str, evaluating: bool = False) -> Optional[str]:
    """The checkpoint a requeued SLURM job continues: its own run's --output_dir/checkpoint.pth, whatever its
    command line says (no --resume, --resume allow, or the --resume PATH it started from, which it has trained
    past). SLURM requeues a job with the same command and SLURM_JOB_ID, SLURM_RESTART_COUNT > 0: a plain
    ``sbatch --requeue`` script as well as submitit. Its first start was checked like any run (a folder holding
    another run was refused then), so the folder's run is its own. None when the job is not requeued, or its
    folder holds no checkpoint.pth yet (it starts as it did the first time), and for an evaluation
    (``evaluating``)."""
    if evaluating or not output_dir or slurm_restarts() < 1:
        return None
    path = os.path.join(output_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    if resume != 'allow' and not (resume and same_path(resume, path)):
        given = f"--resume {resume}, where it started" if resume else "no --resume"
        log(f"requeued SLURM job {os.environ['SLURM_JOB_ID']} (restart {slurm_restarts()}): continuing its own run "
            f"from {path} ({given})")
    return path


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


def check_replaceable(folder: RunFolder, start_epoch: int) -> None:
    """Every existing file of the folder a training run writes again must be replaceable, so that the run does
    not train until its first save and fail there: the files it writes from ``start_epoch``, the epoch it starts
    at (``writes``); a numbered checkpoint of an earlier epoch stays as it is."""
    output_dir = folder.output_dir
    for name in run_files(output_dir):
        if not writes(folder, os.path.join(output_dir, name), start_epoch):
            continue
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
                if os.path.isdir(self.path) or (os.path.lexists(self.path) and not os.path.isfile(self.path)):
                    raise UserError(f"--output_dir {os.path.dirname(self.path)!r}: {self.path} is not a lock file "
                                    f"of this project ({'a folder' if os.path.isdir(self.path) else 'not a file'}), "
                                    "so whether another run uses the folder cannot be told: remove it if no run "
                                    "uses the folder, or give this run another --output_dir.") from None
                owner = self._read()
                if owner is None:
                    continue  # released meanwhile
                reason = self._stale_reason(owner)
                if reason is None:
                    raise UserError(self._in_use_message(owner)) from None
                log(f"taking over the {reason}: {self.path}")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass  # removed meanwhile
                except OSError as e:
                    raise UserError(f"--output_dir {os.path.dirname(self.path)!r}: cannot remove the {reason} "
                                    f"({e.strerror or e}): delete {self.path} yourself (e.g. as its owner) if no run "
                                    "uses the folder, or give this run another --output_dir.") from e
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


def write_eval_results(args, stats: dict, ckpt_path: str | None, position: tuple | None = None) -> None:
    """--eval: the results, and what was evaluated (the checkpoint, its epoch and step: ``position``; the data,
    the normalisation, the date), in output_dir/eval_results.json (beside the printed lines)."""
    log(f"evaluation: {json.dumps(stats)}")
    if not args.output_dir or not is_main_process():
        return
    os.makedirs(args.output_dir, exist_ok=True)
    epoch, step = position if position is not None else (None, None)
    record = {'checkpoint': ckpt_path or args.finetune, 'epoch': epoch, 'step': step,
              'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'ensemble_with': args.ensemble_with or None, 'data_path': args.eval_data_path, 'mean': args.mean,
              'std': args.std, **stats}
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


def write_log(output_dir: str, stats: dict) -> None:
    """One JSON line of ``output_dir``'s log.txt; NaN and infinity (not JSON) are written as null."""
    if output_dir and is_main_process():
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
        path = os.path.join(output_dir, LOG)
        with open(path, 'a+b') as f:
            # a line cut by a kill or a full disk during its append: the new line starts on a line of its own
            cut = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b'\n'
            f.write((b'\n' if cut else b'') + (json.dumps(finite, allow_nan=False) + '\n').encode('utf-8'))


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
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    cut = lines[-1] if lines and not lines[-1].endswith('\n') and _epoch_of(lines[-1]) is None else None
    if cut is not None:  # the end of an append that a kill or a full disk cut short: not a line of any epoch
        lines = lines[:-1]
    kept = [line for line in lines if (_epoch_of(line) is None or _epoch_of(line) < start_epoch)]
    if len(kept) < len(lines) or cut is not None:
        atomic_write_text(''.join(kept), path)
    if cut is not None:
        log(f"log.txt: removed its last line, cut off while it was written ({len(cut)} characters)")
    if len(kept) < len(lines):
        log(f"log.txt: removed {len(lines) - len(kept)} line(s) of epochs >= {start_epoch}, written after the "
            "resumed checkpoint (those epochs are trained again)")


def open_log_writer(args, position: int):
    """The run's util.tracking.Tracker on rank 0 (None elsewhere, or with neither --log_dir nor --log_wandb):
    TensorBoard events in --log_dir, where points up to the resumed ``position`` (epoch_1000x, as the engine
    writes them) were trained and are kept, later ones (a stopped run's) are purged; W&B with --log_wandb."""
    from util.tracking import Tracker, open_wandb

    if not is_main_process():
        return None
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    tensorboard = None
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        tensorboard = SummaryWriter(log_dir=args.log_dir, purge_step=position + 1 if position else None)
    wandb_run = open_wandb(args)
    return Tracker(tensorboard, wandb_run) if tensorboard is not None or wandb_run is not None else None
