"""Training checkpoints: atomic writes, resume look-up, and the random-number-generator states.

A checkpoint is a dict:
  model       the student's timm state dict (a plain timm checkpoint, MAE/DeiT style)
  teacher     the teacher's state dict, in copy modes only (their students cannot run without it)
  model_ema   the EMA student, when --ema is set
  optimizer, scaler, args (a dict), rng (per-rank generator states)
  epoch, step the position: ``step`` steps of epoch ``epoch`` are done; ``step`` is None once the
              epoch is complete (then training resumes at ``epoch + 1``)
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Optional

import numpy as np
import torch

from util.errors import UserError
from util.pretrained import EMA_ENTRIES, read_checkpoint


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, then rename it over ``path``.

    A crash (or a kill) mid-write leaves the previous file untouched and loadable.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state() -> dict:
    """Every generator's state, as tensors and tuples (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss), 'python': random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def seed_epoch(seed: int, epoch: int, rank: int, loader_generator: Optional[torch.Generator] = None) -> None:
    """Seed every generator from (seed, epoch, rank): an epoch's augmentations, mixup draws, drop-path
    masks and data-loader worker seeds then depend on nothing that happened before it, so a run
    resumed at an epoch boundary repeats the uninterrupted run exactly."""
    value = (seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 31
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    if loader_generator is not None:  # the loader's own: its worker seeds do not draw on the global stream
        loader_generator.manual_seed(value + 1)


def resume_path(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: ``resume`` itself, or for ``allow`` the run's own
    ``output_dir/checkpoint.pth`` when it exists (else None: start fresh)."""
    if not resume:
        return None
    if resume == 'allow':
        path = os.path.join(output_dir, 'checkpoint.pth') if output_dir else ''
        return path if path and os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume!r}: no such checkpoint (use --resume allow to start fresh "
                        "when the output directory has none)")
    return resume


def load_training_checkpoint(path: str, to_train: bool = True) -> dict:
    """A training checkpoint (this project's, or MAE's / DeiT's: a dict with a 'model' entry); to
    continue training (``to_train``) it must hold the optimizer's state and the position too."""
    ckpt = read_checkpoint(path, flag='--resume')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        ema = isinstance(ckpt, dict) and any(isinstance(ckpt.get(k), dict) for k in EMA_ENTRIES)
        raise UserError(f"--resume {path!r} is not a training checkpoint (it has no 'model' entry); "
                        + ("it holds EMA weights only: to start from them use --finetune PATH --use_teacher_ema"
                           if ema else "to start from pre-trained weights use --finetune"))
    missing = [k for k in ('optimizer', 'epoch') if k not in ckpt]
    if to_train and missing:
        raise UserError(f"--resume {path!r} holds model weights only (no {' or '.join(missing)} entry), so no "
                        "training run can continue from it; to start training from these weights use "
                        f"--finetune {path} (and no --resume)")
    return ckpt


def next_position(ckpt: dict) -> tuple[int, int]:
    """(epoch, step) at which training continues after this checkpoint."""
    if ckpt.get('step') is None:
        return ckpt['epoch'] + 1, 0
    return ckpt['epoch'], ckpt['step']
