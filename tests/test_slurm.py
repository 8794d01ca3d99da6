"""submitit_finetune.py on a real single-node Slurm cluster: a 2-task job, preempted mid-epoch, requeued,
resumed from the step it saved, finished, and its final checkpoint evaluated.

The cluster is brought up by tests/slurm/cluster.sh (Debian's slurm-wlm and munge, installed when
missing and running as root) and stopped by process id at the end, also when the test fails.
Job states are read from squeue and from the job's own files (no slurmdbd, so no sacct).
"""
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
from helpers import (
    ROOT,
    ROOT_ONLY,
    args_for,
    immutable,
    kwargs_flags,
    make_teacher_checkpoint,
    read_text,
    squeue_state,
    tiny_args,
    wait_for,
)

import main_finetune
import submitit_finetune
from util.errors import UserError

ARCH = dict(patch_size=8, embed_dim=192, depth=6, num_heads=3)


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_finishes(cluster, shared_images, tmp_path):
    env = {**os.environ, **cluster}
    data = shared_images(train_per_class=32, size=64)
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), img_size=64, **ARCH)
    job_dir = str(tmp_path / 'job')
    submit = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'submitit_finetune.py'), '--job_dir', job_dir, '--nodes', '1',
         '--ngpus', '2', '--ncpus', '1', '--mem_gb', '2', '--timeout', '30', '--partition', 'debug',
         '--device', 'cpu', '--num_workers', '0', '--data_path', data, '--nb_classes', '3',
         '--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(ARCH),
         '--input_size', '64',
         '--mode', 'distill', '--finetune', teacher, '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '0',
         '--lr', '1e-3', '--aa', 'none', '--reprob', '0', '--print_freq', '1', '--resume', 'allow', '--dist_eval'],
        env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r'Submitted job_id: (\d+)', submit.stdout).group(1)
    out_log = os.path.join(job_dir, f'{job_id}_0_log.out')
    err_log = os.path.join(job_dir, f'{job_id}_0_log.err')

    def logs():
        return read_text(out_log) + read_text(err_log)

    try:
        # preempt once the job is inside epoch 0
        wait_for(lambda: 'Epoch [0] [2/12]' in read_text(out_log), 240, 'the job to train two steps')
        subprocess.run(['scancel', '--signal=USR2', job_id], env=env, check=True)
        wait_for(lambda: squeue_state(job_id, env)[1] == 'BeginTime' or 'requeuing' in read_text(out_log), 120,
                 'the job to save and requeue itself')
        wait_for(lambda: squeue_state(job_id, env) == ('PENDING', 'BeginTime'), 60, 'the requeued job to wait')
        subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'StartTime=now'], env=env, check=True)
        wait_for(lambda: squeue_state(job_id, env)[0] == 'GONE', 600, 'the resumed job to finish', interval=1)
    except AssertionError:
        print(logs()[-6000:])
        raise

    text = read_text(out_log)
    saved = re.search(r'preempted: state saved at epoch (\d+), step (\d+)', text)
    assert saved, logs()[-4000:]
    epoch, step = int(saved.group(1)), int(saved.group(2))
    assert (epoch, step) >= (0, 2)
    assert f'resumed from {job_dir}/checkpoint.pth: epoch {epoch}, step {step}' in text
    assert 'restart 1' in text
    # the logged step counter is continuous: no step trained twice or skipped
    for e in (0, 1):
        assert re.findall(rf'Epoch \[{e}\] \[(\d+)/12\]', text) == [str(i) for i in range(1, 13)], text[-4000:]
    log = [line for line in read_text(os.path.join(job_dir, 'log.txt')).splitlines() if line]
    assert len(log) == 2
    assert 'Job completed successfully' in text

    stats = main_finetune.run(['--eval', '--resume', os.path.join(job_dir, 'checkpoint.pth'), '--data_path', data,
                               '--device', 'cpu', '--num_workers', '0'])
    assert stats['test_images'] == 18 and 0.0 <= stats['test_acc1'] <= 100.0


# ---- the launcher without Slurm ------------------------------------------------------------------
@pytest.mark.slow
def test_debug_cluster_runs_the_job_in_process(labelled, tmp_path):
    data = labelled.data
    argv = tiny_args(data, '', '--mode', 'none', '--lr', '3e-3', epochs=1)
    i = argv.index('--output_dir')
    del argv[i:i + 4]  # output_dir and log_dir default to the job directory
    with mock.patch.dict(os.environ):
        job = submitit_finetune.main(['--job_dir', str(tmp_path / 'job_%j'), '--cluster', 'debug', *argv])
    job_dir = tmp_path / f'job_{job.job_id}'
    assert (job_dir / 'checkpoint.pth').is_file() and (job_dir / 'log.txt').is_file()
    assert list(job_dir.glob('events.out.tfevents.*'))


def test_job_dir_is_required_without_a_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit_finetune, 'SHARED_FOLDER', str(tmp_path / 'no_such_shared_folder'))
    with pytest.raises(UserError, match='--job_dir is required: no shared folder'):
        submitit_finetune.main(['--data_path', str(tmp_path), '--cluster', 'debug'])


# ---- moved from test_run_folder.py: an unwritable --job_dir --------------------------------------------------------
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
