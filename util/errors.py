"""The error type for bad input: a flag, a path, a checkpoint or data that the user can fix.

Entry points report a ``UserError`` as one ``error:`` paragraph that names the flag or file, the
problem and the fix, without a traceback; any other exception is a bug and keeps its traceback.
Every script runs its ``main`` through ``run_cli``; ``ATTN_TRANSFER_DEBUG=1`` adds the traceback to
user errors too.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

DEBUG_ENV = 'ATTN_TRANSFER_DEBUG'
T = TypeVar('T')


class UserError(Exception):
    """Bad input the user can fix; the message names the flag or file, what is wrong and what to do."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def _under_launcher() -> bool:
    """Whether other processes of the job wait on this one (torchrun, srun, submitit)."""
    return int(os.environ.get('WORLD_SIZE', '1') or 1) > 1


def _exit_failed() -> None:
    """Exit with status 1. Under torchrun / srun a normal exit could hang in the process group's
    teardown while the other ranks wait in a collective: a failed rank must take the job down."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _under_launcher():
        os._exit(1)
    sys.exit(1)


def run_cli(main: Callable[..., T], *args, **kwargs) -> T:
    """Run a script's ``main``: a UserError becomes ``error: <message>`` on stderr and exit status 1,
    with no traceback (unless ATTN_TRANSFER_DEBUG=1); any other exception prints its traceback, and
    under a distributed launcher exits at once so that the other ranks are not left waiting."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if _debug():
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        _exit_failed()
    except Exception:
        if not _under_launcher():
            raise
        traceback.print_exc()
        _exit_failed()
