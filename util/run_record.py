"""How a run was made, kept in its folder and in its checkpoints.

    config.yaml       the run's resolved flags (the mode's defaults and the values resolved from the checkpoint
                      included), one per line; ``--config config.yaml`` reads them back as the defaults of a new
                      command, so that ``--config RUN/config.yaml --output_dir OTHER`` starts the same run
    run_record.json   every start of the run: command line, working folder, git revision (and whether the tree
                      had changes), Python / torch / timm / torchvision / CUDA versions, host, world size, devices,
                      start time, and the epoch and step it started from; a resumed or requeued run adds its start
    console.txt       rank 0's console output (stdout and stderr), appended at each start

Checkpoints carry the starts as their args' ``run_record`` entry, so a checkpoint alone says how it was made.
The files are written when the run begins to train (after every check), on rank 0, atomically; until then
the console is kept in memory, so that a refused command leaves nothing behind.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, TextIO

import torch
import yaml

from util.distributed import get_world_size, is_main_process

CONFIG_FILE = 'config.yaml'
RECORD_FILE = 'run_record.json'
CONSOLE_FILE = 'console.txt'
RECORD_KEY = 'run_record'
# Values of the resolved configuration that are not flags a command can give: how the job was launched, what
# resolution derived, and this module's own.
NOT_FLAGS = {'explicit_flags', 'selection_pending', 'distributed', 'rank', 'gpu', 'mixup_active', 'world_size',
             'local_rank', 'dist_url', 'config', 'command', 'resume', 'start_epoch', 'model_spec', RECORD_KEY}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(root: str = ROOT) -> dict:
    """The code's git revision and whether tracked files differ from it (None where git or the repository is
    missing, e.g. an installed copy)."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git('rev-parse', 'HEAD')
    changes = git('status', '--porcelain', '--untracked-files=no') if revision else None
    return {'revision': revision, 'dirty': None if changes is None else bool(changes)}


def versions() -> dict:
    import timm
    import torchvision

    return {'python': platform.python_version(), 'torch': str(torch.__version__), 'timm': str(timm.__version__),
            'torchvision': str(torchvision.__version__), 'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}


def devices() -> list[str]:
    if not torch.cuda.is_available():
        return ['cpu']
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def command_line(script: str, argv: Optional[Sequence[str]]) -> list[str]:
    """The command a script's ``run(argv)`` was given (its own command line when ``argv`` is None)."""
    return [script, *(sys.argv[1:] if argv is None else argv)]


def start_record(command: Optional[Sequence[str]], epoch: int, step: int) -> dict:
    """This start of the run: what was typed (``command``, else this process's command line), the code, the
    software, the machine, the time and the position it starts from."""
    argv = list(sys.argv if command is None else command)
    return {'command': ' '.join(argv), 'argv': argv, 'cwd': os.getcwd(), 'git': git_state(), 'versions': versions(),
            'host': socket.gethostname(), 'world_size': get_world_size(), 'devices': devices(),
            'slurm_job': os.environ.get('SLURM_JOB_ID'),
            'start_time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'epoch': epoch, 'step': step}


def recorded_starts(ckpt: Optional[Mapping]) -> list[dict]:
    """The starts a checkpoint records (none before they were recorded)."""
    saved = ckpt.get('args') if isinstance(ckpt, Mapping) else None
    starts = saved.get(RECORD_KEY) if isinstance(saved, Mapping) else None
    return list(starts) if isinstance(starts, list) else []


def plain(value: Any) -> Any:
    """A value as YAML writes and --config reads it back (tuples as lists, other objects as text)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def flag_values(cfg: Any, flags: Iterable[str]) -> dict:
    """The resolved value of each flag in ``flags`` (the script's parser's destinations), as config.yaml holds
    them; --log_dir only when given (by default it follows --output_dir)."""
    given = set(getattr(cfg, 'explicit_flags', None) or ())
    values = {k: plain(getattr(cfg, k)) for k in sorted(flags) if k not in NOT_FLAGS and hasattr(cfg, k)}
    if 'log_dir' in values and 'log_dir' not in given:
        values['log_dir'] = None
    return values


def write_run_files(output_dir: str, config: dict, starts: list[dict], console: Optional[Console]) -> None:
    """config.yaml and run_record.json, atomically, and the console kept so far into console.txt (rank 0)."""
    from util.output import atomic_write_text

    if not is_main_process():
        return
    if not output_dir:
        if console is not None:
            console.drop()  # nowhere to keep it
        return
    header = "# the resolved flags of this run; `--config` of this file (other flags on the command line win)\n"
    atomic_write_text(header + yaml.safe_dump(config, sort_keys=True, default_flow_style=None, width=120),
                      os.path.join(output_dir, CONFIG_FILE))
    atomic_write_text(json.dumps({'starts': starts}, indent=1), os.path.join(output_dir, RECORD_FILE))
    if console is not None:
        console.keep_in(os.path.join(output_dir, CONSOLE_FILE))


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO, console: Console) -> None:
        self.stream, self.console = stream, console

    def write(self, text: str) -> int:
        self.console.add(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:  # the terminal's (os.write to it bypasses the kept copy)
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, 'encoding', 'utf-8')

    def __getattr__(self, name: str) -> Any:  # anything else: the stream's
        return getattr(self.stream, name)


class Console:
    """Rank 0's stdout and stderr, also kept: in memory until ``keep_in`` names the run's file, then appended
    to it line by line. A context manager (``Console.current`` while it is entered); other ranks keep nothing."""
    current: Optional[Console] = None

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.file: Optional[TextIO] = None
        self.saved: Optional[tuple[TextIO, TextIO]] = None
        self.keep = True

    def __enter__(self) -> Console:
        if is_main_process():
            self.saved = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
            Console.current = self
        return self

    def __exit__(self, *exc: Any) -> None:
        Console.current = None
        if self.saved is not None:
            sys.stdout, sys.stderr = self.saved
        if self.file is not None:
            self.file.close()
            self.file = None

    def add(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        elif self.keep:
            self.buffer.append(text)

    def drop(self) -> None:
        self.buffer, self.keep = [], False

    def keep_in(self, path: str) -> None:
        if self.file is None:
            self.file = open(path, 'a', buffering=1)
            self.file.write(''.join(self.buffer))
            self.file.flush()
            self.buffer = []
