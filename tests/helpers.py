"""The tiny model, generated data and checkpoints, and command lines shared by the tests (nothing is
downloaded)."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import engine_finetune
import main_finetune
import modes
import select_wild_data
import util.eval_classes
from models_vit import create_vit
from util.errors import UserError
from util.losses import TransferCriterion
from util.run_control import Preempted, clear_stop, request_stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the script that starts and stops the Slurm cluster of tests/test_slurm.py and tests/test_multinode.py
SLURM_CLUSTER = os.path.join(ROOT, 'tests', 'slurm', 'cluster.sh')

# The one tiny ViT of the tests, small enough for CPU: 32x32 input, patch 8 -> 16 patches + class token,
# width 48, 4 blocks, 3 heads.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
# the data flags a resolved configuration always holds, for tests that build datasets from a namespace of their own
DATA_DEFAULTS = dict(jpeg_draft=False, eval_crop_pct=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     min_crop_scale=0.08, hflip=0.5)
# the same ViT's architecture arguments without the input size (teacher_kwargs, a checkpoint's model_kwargs)
TINY_ARCH = {k: v for k, v in TINY.items() if k != 'img_size'}


def kwargs_flags(arch: dict) -> list[str]:
    """Architecture arguments as --model_kwargs takes them: ['patch_size=8', ...]."""
    return [f'{k}={v}' for k, v in arch.items()]


def colour_image(rng: np.random.Generator, label: int, size: int = 32) -> Image.Image:
    """A noisy image whose class is the colour channel that is bright, in a random quadrant."""
    img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
    h = size // 2
    y, x = rng.integers(0, 2, size=2) * h
    img[y:y + h, x:x + h, label % 3] = rng.integers(180, 256, size=(h, h))
    return Image.fromarray(img)


def make_image_folder(root: str, classes: int = 3, train_per_class: int = 16, val_per_class: int = 6,
                      size: int = 32, seed: int = 0) -> str:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` of a learnable colour task."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                colour_image(rng, c, size).save(os.path.join(folder, f'{i:03d}.png'))
    return str(root)


def make_teacher_checkpoint(path: str, classes: int = 3, sharpen: float = 6.0, img_size: int = 32, **arch) -> str:
    """An MAE-style teacher checkpoint (tiny architecture unless ``arch`` says otherwise) whose attention
    depends on the input."""
    torch.manual_seed(123)
    vit = create_vit('vit_base_patch16_224', num_classes=classes, global_pool='avg', img_size=img_size,
                     **{**TINY_ARCH, **arch})
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.attn_dim].mul_(sharpen)
    torch.save({'model': vit.state_dict(), 'epoch': 0}, path)
    return str(path)


def tiny_args(data: str, out: str, *extra: str, epochs: int = 2) -> list[str]:
    """A quick, learnable command line for main_finetune.py on generated data."""
    return ['--data_path', data, '--output_dir', out, '--log_dir', out, '--nb_classes', '3',
            '--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(TINY_ARCH), '--input_size', '32',
            '--batch_size', '8', '--epochs', str(epochs), '--warmup_epochs', '0', '--blr', '2e-3',
            '--layer_decay', '1.0', '--weight_decay', '0.0', '--aa', 'none', '--reprob', '0', '--smoothing', '0',
            '--drop_path', '0.0', '--num_workers', '0', '--device', 'cpu', '--print_freq', '2', *extra]


def args_for(workdir, out, *extra, epochs=2) -> list[str]:
    """tiny_args on the shared data, fine-tuned from the shared teacher at lr 3e-3."""
    return tiny_args(workdir.data, str(out), '--finetune', workdir.teacher, '--lr', '3e-3', *extra, epochs=epochs)


def pair_of(mode: str, *flags: str, classes: int = 5, arch: dict | None = None, drop_path: float = 0.0):
    """The randomly initialised pair main_finetune.py builds for ``--mode mode`` with ``flags`` (a tiny teacher
    of ``arch``, 32 x 32 inputs), through the run's own model description (util.model_record.describe_model)."""
    from modes import get_mode
    from util.args import parse_kwargs
    from util.config import Config
    from util.model_record import describe_model

    argv = ['--mode', mode, '--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(arch or TINY_ARCH),
            '--input_size', '32', '--nb_classes', str(classes), '--attention_impl', 'explicit', *flags]
    cfg = Config.of(main_finetune.get_args_parser().parse_args(argv))
    cfg = cfg.replace(model_kwargs=parse_kwargs(cfg.model_kwargs, '--model_kwargs'),
                      student_kwargs=parse_kwargs(cfg.student_kwargs, '--student_kwargs'),
                      mean=[0.5] * 3, std=[0.5] * 3, mixup_active=False)
    mode_ = get_mode(mode)
    return mode_.build_model(describe_model(cfg, mode_), drop_path=drop_path, attention_impl=cfg.attention_impl)


def read_log(out) -> list[dict]:
    """log.txt's lines; NaN or infinity in it fails the test (log.txt is strict JSON)."""
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in log.txt')) for line in f]


def make_wild_folder(root, n_task=12, n_noise=12, size=32, seed=1):
    """Task-like images (the colour task) mixed with pure-noise distractors, in nested folders."""
    rng = np.random.default_rng(seed)
    for i in range(n_task):
        folder = os.path.join(root, 'a' if i % 2 else 'b', 'deep')
        os.makedirs(folder, exist_ok=True)
        colour_image(rng, i % 3, size).save(os.path.join(folder, f'task_{i:02d}.png'))
    os.makedirs(os.path.join(root, 'noise'), exist_ok=True)
    for i in range(n_noise):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(root, 'noise', f'noise_{i:02d}.jpg'))
    return str(root)


def run_selection(teacher_path, wild, output, *extra):
    """select_wild_data.py on a wild folder: 10 selected, chunks of 7, on the CPU."""
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', output, '--num_select', '10',
         '--chunk_size', '7', '--batch_size', '5', '--num_workers', '0', '--device', 'cpu', *extra])
    return select_wild_data.main(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def torchrun(args, env=None, timeout=240) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py (main_finetune.run, recording each rank's weights) in 2 processes on the CPU."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(free_port()), os.path.join(ROOT, 'tests', 'ddp_worker.py'), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def add_to_hub_cache(cache: str, repo_id: str, files: dict) -> str:
    """Put files (name -> source path) into a huggingface_hub cache folder (HF_HUB_CACHE) as a download
    of ``repo_id`` at revision main would leave them: refs/main naming a snapshot that holds the files."""
    commit = '0123456789abcdef0123456789abcdef01234567'
    repo = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
    os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(commit)
    snapshot = os.path.join(repo, 'snapshots', commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, os.path.join(snapshot, name))
    return snapshot


def stop_at_forward(monkeypatch, n: int) -> None:
    """Request a stop (as the preemption handler does) during the n-th forward pass of the run (1-based)."""
    forward, calls = TransferCriterion.forward, [0]

    def forward_then_stop(self, outputs, targets):
        calls[0] += 1
        if calls[0] == n:
            request_stop()
        return forward(self, outputs, targets)

    monkeypatch.setattr(TransferCriterion, 'forward', forward_then_stop)


def run_until_stopped(workdir, monkeypatch, out, n_forward, *extra, epochs=2) -> Preempted:
    stop_at_forward(monkeypatch, n_forward)
    try:
        with pytest.raises(Preempted) as stop:
            main_finetune.run(args_for(workdir, out, *extra, epochs=epochs))
    finally:
        clear_stop()
        monkeypatch.undo()
    return stop.value


def make_unwritable(folder) -> bool:
    """An existing folder nobody (root included, through chattr +i) can create files in; False if impossible.
    Undo with make_writable."""
    os.makedirs(folder)
    if os.geteuid() == 0:
        if not shutil.which('chattr') or subprocess.run(['chattr', '+i', str(folder)]).returncode:
            return False
    else:
        os.chmod(folder, 0o555)
    try:
        open(os.path.join(folder, 'probe'), 'w').close()
    except OSError:
        return True
    os.remove(os.path.join(folder, 'probe'))
    return False


def make_writable(folder) -> None:
    if os.geteuid() == 0:
        subprocess.run(['chattr', '-i', str(folder)])
    else:
        os.chmod(folder, 0o755)


# ---- refusals: the check comes before any long work ------------------------------------------------------
# tests that need root: chattr +i (a file or folder nobody can change), mount (a small tmpfs)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason='needs root (chattr, mount)')


def run_args(work, name, *extra, epochs=1):
    """tiny_args on work.data (the small_work fixture's), written to work.root / name."""
    return tiny_args(work.data, str(work.root / name), *extra, epochs=epochs)


def user_error(argv) -> str:
    """The message of the UserError main_finetune.run(argv) raises."""
    with pytest.raises(UserError) as err:
        main_finetune.run(argv)
    return str(err.value)


def no_long_work(monkeypatch, *names):
    """Make the named functions of main_finetune (or of the engine) fail the test when called: the check must
    come first."""
    for name in names:
        found = [m for m in (main_finetune, engine_finetune, util.eval_classes, modes) if hasattr(m, name)]
        assert found, name
        for module in found:
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))


def no_training(monkeypatch):
    """Training fails the test when it starts: the run must refuse first."""
    monkeypatch.setattr(engine_finetune, 'train_one_epoch', lambda *a, **k: pytest.fail('training started'))


@contextlib.contextmanager
def immutable(path):
    """``chattr +i`` on a file or folder, undone at the end; skips where the filesystem cannot do it."""
    if subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode:
        pytest.skip(f'chattr +i is not supported for {path}')
    try:
        yield
    finally:
        subprocess.run(['chattr', '-i', str(path)], check=True)


# ---- a Slurm cluster on this machine (the `cluster` fixture of tests/conftest.py) ----------------------
SYSTEM_TESTS_VAR = 'ATTN_TRANSFER_SYSTEM_TESTS'


def slurm_skip_reason(nodes: int) -> str:
    """Why a Slurm cluster of this many nodes cannot be started here ('' if it can). Installing Slurm and munge
    (where no Slurm is installed) and adding the node names to /etc/hosts (two nodes) change the machine: only
    when SYSTEM_TESTS_VAR=1 asks for it (.ci/run sets it)."""
    changes = ('install slurm-wlm and munge with apt-get' if not shutil.which('slurmctld') else '') if nodes == 1 \
        else 'add the node names to /etc/hosts' + ('' if shutil.which('slurmctld') else ' and install slurm-wlm')
    if changes and os.environ.get(SYSTEM_TESTS_VAR) != '1':
        return f"would {changes}, which changes this machine: set {SYSTEM_TESTS_VAR}=1 to allow it"
    if nodes == 1:
        if os.geteuid() != 0 and not shutil.which('slurmctld'):
            return 'needs root (to install and run slurm-wlm and munge) or an installed Slurm'
        if not shutil.which('apt-get') and not shutil.which('slurmctld'):
            return 'Slurm is not installed and there is no apt-get to install it'
        return ''
    if os.geteuid() != 0:
        return 'needs root (to run slurmctld and two slurmd, and to add the node names to /etc/hosts)'
    if not shutil.which('slurmctld') and not shutil.which('apt-get'):
        return 'Slurm is not installed and there is no apt-get to install it'
    if not os.access('/etc/hosts', os.W_OK):
        return '/etc/hosts cannot be written, so the node names cannot be made to resolve'
    return ''


def squeue_state(job_id: str, env: dict) -> tuple[str, str]:
    """(state, reason) of a Slurm job as squeue shows it; ('GONE', '') once it has left the queue."""
    out = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T %r'], env=env, capture_output=True, text=True)
    parts = out.stdout.split()
    return (parts[0], parts[1]) if len(parts) == 2 else ('GONE', '')


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """predicate()'s first true value, polled every interval seconds; AssertionError after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_text(path: str) -> str:
    """The file's text, or '' while it does not exist (a job's log before the job starts)."""
    return open(path).read() if os.path.exists(path) else ''
