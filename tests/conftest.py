"""Shared fixtures: generated image folders (one per distinct set of arguments, read only), the tiny
teacher checkpoint, per-module output folders beside them, a 3-epoch distill run with an EMA, one-epoch
runs (distill and copy, with an EMA; distill and copy each with its own teacher; an lr floor above the peak),
and a Slurm cluster on this machine."""
import contextlib
import inspect
import io
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from helpers import SLURM_CLUSTER, make_image_folder, make_teacher_checkpoint, read_log, slurm_skip_reason, tiny_args  # noqa: E402

import main_finetune  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _listing(root: str) -> list:
    """Every entry under root with its size and modification time: what a write would change."""
    entries = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            st = os.lstat(path)
            entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return sorted(entries)


@pytest.fixture(scope='session')
def _read_only():
    """Folders shared by the whole session: at its end, each must be as it was made (tests that write into
    their data or teacher make their own)."""
    made = {}
    yield lambda root: made.setdefault(str(root), _listing(str(root)))
    changed = [root for root, listing in made.items() if _listing(root) != listing]
    assert not changed, f"tests changed shared generated folders, which must stay read only: {changed}"


@pytest.fixture(scope='session')
def shared_images(tmp_path_factory, _read_only):
    """make_image_folder(**kwargs) generated once per session for each distinct set of arguments
    (classes, train_per_class, val_per_class, size, seed); the folder is shared: read only."""
    made = {}
    signature = inspect.signature(make_image_folder)

    def get(**kwargs) -> str:
        bound = signature.bind('', **kwargs)
        bound.apply_defaults()
        key = tuple(sorted((k, v) for k, v in bound.arguments.items() if k != 'root'))
        if key not in made:
            made[key] = make_image_folder(str(tmp_path_factory.mktemp('images')), **kwargs)
            _read_only(made[key])
        return made[key]

    return get


@pytest.fixture(scope='session')
def labelled(shared_images, tmp_path_factory, _read_only):
    """The labelled data set of the end-to-end tests (3 classes of 16 training and 6 validation 32x32 images:
    48 training images, 6 steps of 8) and the tiny teacher checkpoint (helpers.TINY). Read only."""
    folder = tmp_path_factory.mktemp('teacher')
    teacher = make_teacher_checkpoint(str(folder / 'teacher.pth'))
    _read_only(folder)
    return SimpleNamespace(data=shared_images(), teacher=teacher)


@pytest.fixture(scope='module')
def workdir(labelled, tmp_path_factory, request):
    """The shared data and teacher, and an output folder (root) of this test module's own."""
    root = tmp_path_factory.mktemp(request.module.__name__.removeprefix('test_'))
    return SimpleNamespace(root=root, data=labelled.data, teacher=labelled.teacher)


@pytest.fixture(scope='module')
def small_work(labelled, shared_images, tmp_path_factory, request):
    """The shared teacher, 8 training and 3 validation images a class (3 steps of 8), and an output folder
    (root) of this test module's own, apart from workdir's."""
    root = tmp_path_factory.mktemp(request.module.__name__.removeprefix('test_') + '_small')
    return SimpleNamespace(root=root, data=shared_images(train_per_class=8, val_per_class=3), teacher=labelled.teacher)


@pytest.fixture(scope='session')
def pair_runs(labelled, shared_images, tmp_path_factory):
    """One-epoch runs on small_work's data in distill mode and in copy mode (layers 0-2 of 4 copied), each
    with its own copy of the teacher: pair_runs[mode].out, .teacher, .checkpoint."""
    root = tmp_path_factory.mktemp('pair_runs')
    data = shared_images(train_per_class=8, val_per_class=3)
    runs = {}
    for mode, extra in (('distill', ()), ('copy', ('--end_layer', '-1'))):
        runs[mode] = SimpleNamespace(out=str(root / mode), teacher=str(root / f'{mode}_teacher.pth'))
        shutil.copy(labelled.teacher, runs[mode].teacher)
        main_finetune.run(tiny_args(data, runs[mode].out, '--mode', mode, '--finetune', runs[mode].teacher,
                                    *extra, epochs=1))
        runs[mode].checkpoint = os.path.join(runs[mode].out, 'checkpoint.pth')
    return runs


@pytest.fixture(scope='session')
def floor_run(shared_images, tmp_path_factory):
    """One epoch on small_work's data whose --min_lr is above its peak lr (the seed's copy recipe on too small
    a batch): its folder (out), data, and what it printed."""
    data = shared_images(train_per_class=8, val_per_class=3)
    out = str(tmp_path_factory.mktemp('floor') / 'floor')
    printed, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        main_finetune.run(tiny_args(data, out, '--blr', '1e-3', '--min_lr', '2e-3', '--warmup_epochs', '0', epochs=1))
    return SimpleNamespace(out=out, data=data, stdout=printed.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope='session')
def ema_distill_run(shared_images, labelled, tmp_path_factory):
    """A 3-epoch distill run with an EMA and --save_best ema, on 8 training and 4 validation images a class,
    written to root/runs/distill (where the README's examples expect it); no --log_dir is given. (On this
    data the EMA's best comes neither first nor last.) Returns root, the run's folder, its stats and log."""
    root = tmp_path_factory.mktemp('ema_distill')
    data = shared_images(train_per_class=8, val_per_class=4)
    out = str(root / 'runs' / 'distill')
    argv = tiny_args(data, out, '--mode', 'distill', '--finetune', labelled.teacher, '--lr', '3e-3', '--ema', '0.5',
                     '--save_best', 'ema', epochs=3)
    i = argv.index('--log_dir')
    del argv[i:i + 2]
    stats = main_finetune.run(argv)
    return SimpleNamespace(root=root, out=out, stats=stats, log=read_log(out))


@pytest.fixture(scope='session')
def one_epoch_runs(labelled, tmp_path_factory):
    """One epoch in distill and in copy mode with an EMA (0.5) from the shared teacher on the shared data:
    out['distill'], out['copy'] are the runs' folders."""
    root = tmp_path_factory.mktemp('one_epoch_runs')
    out = {}
    for mode in ('distill', 'copy'):
        out[mode] = str(root / mode)
        main_finetune.run(tiny_args(labelled.data, out[mode], '--mode', mode, '--finetune', labelled.teacher,
                                    '--lr', '3e-3', '--ema', '0.5', epochs=1))
    return SimpleNamespace(root=root, data=labelled.data, teacher=labelled.teacher, out=out)


@pytest.fixture(scope='module')
def cluster(request, tmp_path_factory):
    """A Slurm cluster of tests/slurm/cluster.sh for the test module, of as many nodes as the module's
    SLURM_NODES says (1 if it says nothing); yields the environment its clients need ({'SLURM_CONF': ...}),
    to be added to the environment of sbatch, squeue, scontrol and submitit. Stopped by process id at the
    end, also when a test fails; skips where it cannot be started (slurm_skip_reason)."""
    nodes = getattr(request.module, 'SLURM_NODES', 1)
    reason = slurm_skip_reason(nodes)
    if reason:
        print(f"skipping the {nodes}-node Slurm tests: {reason}")
        pytest.skip(reason)
    state = str(tmp_path_factory.mktemp(f'slurm-{nodes}-nodes'))
    env = {**os.environ, 'SLURM_TEST_DIR': state}
    started = subprocess.run(['bash', SLURM_CLUSTER, 'start', '--nodes', str(nodes)], env=env, capture_output=True,
                             text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {'SLURM_CONF': os.path.join(state, 'slurm.conf')}
    finally:
        subprocess.run(['bash', SLURM_CLUSTER, 'stop'], env=env, capture_output=True, text=True, timeout=120)
