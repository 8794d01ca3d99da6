"""Reporting errors (util/errors.run_cli): bad input is one `error:` line naming the flag or file, the problem
and the fix, exit status 1 and no traceback (unless ATTN_TRANSFER_DEBUG=1); bugs keep their traceback; every
entry point reports through it."""
import os
import subprocess
import sys

import pytest
from helpers import ROOT, run_args

from tools import export_student
from util.datasets import DataError
from util.errors import DEBUG_ENV, UserError, run_cli
from util.pretrained import CheckpointMismatchError

ENTRY_POINTS = ['main_finetune.py', 'main_pretrain.py', 'main_detection.py', 'select_wild_data.py',
                'submitit_finetune.py', 'submitit_detection.py', 'demo.py', 'tools/export_student.py',
                'tools/prepare_cifar.py', 'tools/prepare_tinyimagenet.py', 'tools/visualize_attention.py',
                'tools/make_coco_miniature.py']


# ---- reporting: one error line, bugs keep their traceback ----------------------------------------------------------
def test_run_cli_prints_one_error_paragraph_and_exits_1(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def bad():
        raise UserError("--flag 3: must be below 2; pass --flag 1")
    with pytest.raises(SystemExit) as stop:
        run_cli(bad)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: --flag 3: must be below 2; pass --flag 1\n"

    monkeypatch.setenv(DEBUG_ENV, '1')
    with pytest.raises(SystemExit):
        run_cli(bad)
    err = capsys.readouterr().err
    assert 'Traceback' in err and err.endswith("error: --flag 3: must be below 2; pass --flag 1\n")


def test_run_cli_lets_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)

    def bug():
        raise KeyError('not a user error')
    with pytest.raises(KeyError):
        run_cli(bug)
    assert run_cli(lambda x: x + 1, 1) == 2


def test_every_entry_point_reports_through_run_cli():
    for script in ENTRY_POINTS:
        with open(os.path.join(ROOT, script)) as f:
            tail = f.read().split("if __name__ == '__main__':")[-1]
        assert 'run_cli(' in tail, f"{script} does not run its main through util.errors.run_cli"


def test_existing_error_types_are_user_errors():
    for kind in (DataError, CheckpointMismatchError, export_student.ExportError):
        assert issubclass(kind, UserError)


@pytest.mark.slow
def test_main_finetune_bad_flag_prints_error_without_traceback(small_work):
    env = {k: v for k, v in os.environ.items() if k not in (DEBUG_ENV, 'WORLD_SIZE', 'RANK')}
    cmd = [sys.executable, os.path.join(ROOT, 'main_finetune.py'), *run_args(small_work, 'cli', '--drop_path', '1.5')]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    assert out.stderr.startswith('error: --drop_path 1.5'), out.stderr
    assert not os.path.exists(small_work.root / 'cli')  # nothing written
