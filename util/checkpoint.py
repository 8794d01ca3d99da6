"""The checkpoint format: its keys, the accessors that read them, the positions a run continues from, the
random-number-generator states, and the ``Checkpointer`` the run loop saves and loads through. No other module
reads a checkpoint key. The checkpointer saves named components (objects with state_dict / load_state_dict)
that the trainer declares; the files' names and their atomic writes are util/output.py's.

A checkpoint is a dict:
  model       the student's timm state dict (a plain timm checkpoint, MAE/DeiT style)
  teacher     the teacher's state dict, in copy modes only (their students cannot run without it)
  model_ema   the EMA student, when --ema is set
  optimizer, scaler, args (the run's flags as a dict, with the values resolved from them: the student's
              architecture, lr, epochs), rng (rank 0's generator states), best (best accuracies and epochs)
  criterion, aux_optimizer  the criterion's own parameters and their optimizer (probe: noise adaptation)
  epoch, step the position: ``step`` steps of epoch ``epoch`` are done; ``step`` is None once the
              epoch is complete (then training resumes at ``epoch + 1``)
  samples     mid-epoch only: samples of the epoch consumed over all ranks (step x batch x world_size),
  world_size  and the number of ranks; a resume with another batch size or world size continues there
  partial_epoch  mid-epoch only: the epoch's loss sums so far (its log line covers the whole epoch)
  epoch_stats    end of epoch only: the epoch's training means, for its log.txt line (a run stopped between
                 the checkpoint and that line writes it when resumed)
  rng_per_rank   every rank's generator states (``rng`` is rank 0's)
"""
from __future__ import annotations

import argparse
import filecmp
import math
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np
import torch

from util.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
    log,
)
from util.errors import UserError
from util.output import BEST, CHECKPOINT, NUMBERED, numbered, save_atomic
from util.pretrained import EMA_ENTRIES, is_named, load_exact, read_checkpoint
from util.samplers import check_same_permutation


class NonFiniteStateError(UserError):
    """The model or optimizer state holds NaN or infinite values: no checkpoint is written (reported as one
    ``error:`` line naming the last good checkpoint and the flags to change)."""


def non_finite_tensors(state: Any, prefix: str = '') -> Iterator[str]:
    """Names of the floating-point tensors in a nested checkpoint dict that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not torch.isfinite(state).all():
            yield prefix
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from non_finite_tensors(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from non_finite_tensors(value, f'{prefix}.{i}')
    elif isinstance(state, float) and not math.isfinite(state):
        yield prefix


def check_finite(state: dict, entries: list[str], target: str, last_good: Optional[str],
                 device: torch.device) -> None:
    """Raise NonFiniteStateError on every rank if the ``entries`` of any rank's state hold NaN or inf.

    A loss can be finite while the update after it overflows the weights; such a checkpoint would
    fail again at once on resume, so it is not written and the message names the last good one."""
    bad = [name for key in entries if key in state for name in non_finite_tensors(state[key], key)]
    votes = all_reduce_sum(torch.tensor([float(len(bad))], device=device))  # NCCL reduces device tensors only
    if votes.item() == 0:
        return
    where = (', '.join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else '')) if bad else 'another rank'
    resume = (f"the last good checkpoint is {last_good}: resume from it with a lower learning rate (or "
              "--clip_grad, or --amp bf16 instead of fp16)" if last_good else
              "no good checkpoint was written by this run (and none was resumed): start again with a lower "
              "learning rate (or --clip_grad, or --amp bf16 instead of fp16)")
    raise NonFiniteStateError(f"non-finite values in the model or optimizer state ({where}), although the losses "
                              f"were finite: the last updates diverged. {target} was not written; {resume}.")


def resume_rng(ckpt: dict, rank: int, world_size: int, batch_size: int) -> Optional[dict]:
    """This rank's generator states to continue a mid-epoch checkpoint with, when the run is the same
    shape (ranks and batch size): then the rest of the epoch draws what the uninterrupted run would
    have. Otherwise None: the epoch's own seeding, exact in samples but not in augmentation draws."""
    saved_batch = (ckpt.get('args') or {}).get('batch_size')
    per_rank = ckpt.get('rng_per_rank')
    if saved_batch != batch_size:
        return None
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank]
    if world_size == 1 and ckpt.get('world_size', 1) == 1:
        return ckpt.get('rng')
    return None


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


def load_training_checkpoint(path: str, to_train: bool = True) -> dict:
    """A training checkpoint (this project's, or MAE's / DeiT's: a dict with a 'model' entry); to
    continue training (``to_train``) it must hold the optimizer's state and the position too."""
    try:
        ckpt = read_checkpoint(path, flag='--resume')
    except UserError as e:
        intact = intact_neighbour(path)
        if intact is None:
            raise
        raise UserError(f"--resume {path!r}: cannot read it ({e}). Its folder holds {intact}, which reads: resume "
                        f"from it with --resume {intact.split(' (')[0]}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        ema = isinstance(ckpt, dict) and any(isinstance(ckpt.get(k), dict) for k in EMA_ENTRIES)
        raise UserError(f"--resume {path!r} is not a training checkpoint (it has no 'model' entry); "
                        + ("it holds EMA weights only: to start from them use --finetune PATH --use_teacher_ema"
                           if ema else "to start from pre-trained weights use --finetune"))
    if to_train and 'converted_from' in ckpt:  # read_checkpoint converted it, leaving its optimizer state out
        raise UserError(f"--resume {path!r} is a checkpoint of the attention transfer reference's dual model: its "
                        "optimizer state does not map onto this project's student, so training cannot continue from "
                        "it. Evaluate it with --eval --resume, ensemble it with --ensemble_with, export its student "
                        "with tools/export_student.py, or start a new run from its student with --finetune.")
    missing = [k for k in ('optimizer', 'epoch') if k not in ckpt]
    if to_train and missing:
        raise UserError(f"--resume {path!r} holds model weights only (no {' or '.join(missing)} entry), so no "
                        "training run can continue from it; to start training from these weights use "
                        f"--finetune {path} (and no --resume)")
    return ckpt


def intact_neighbour(path: str) -> Optional[str]:
    """The newest other checkpoint of ``path``'s run folder that can be read (numbered ones, newest first),
    described with its position; None when there is none."""
    folder = os.path.dirname(os.path.abspath(path))
    numbered = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                       if (m := NUMBERED.fullmatch(name))), reverse=True)
    for _, name in numbered:
        candidate = os.path.join(folder, name)
        if os.path.samefile(candidate, path):
            continue
        try:
            ckpt = torch.load(candidate, map_location='cpu', mmap=True, weights_only=True)
        except Exception:  # unreadable too: try the next one
            continue
        if isinstance(ckpt, dict) and 'epoch' in ckpt:
            return describe_checkpoint(candidate, ckpt['epoch'], ckpt.get('step'))
    return None


def check_resume_matches(ckpt: Optional[dict], path: Optional[str], finetune: str, teacher_from_finetune: bool,
                         evaluating: bool = False) -> None:
    """A training run continues the checkpoint's run with the same teacher (the mode is the mode's own check,
    ``modes.PlainTraining.check_resumed``; ``finetune``: this command's --finetune). ``teacher_from_finetune``:
    whether this mode reads its teacher from --finetune (copy modes take it from the checkpoint, when it holds
    one). Checks nothing for --eval (``evaluating``), which takes the model's arguments from the checkpoint."""
    saved = recorded_args(ckpt) if not evaluating else {}
    if not saved:
        return
    recorded, given = saved.get('finetune') or '', finetune or ''
    if not given or given == recorded:
        return
    if holds_teacher(ckpt) or not teacher_from_finetune:
        used = ("the teacher's weights come from the checkpoint, which holds them" if holds_teacher(ckpt) else
                "the student's weights come from the checkpoint")
        _warn(f"--finetune {given} is not the run's recorded --finetune {recorded or '(none)'} and is not used when "
              f"resuming {path}: {used}")
        return
    same = same_file(recorded, given) if recorded else None
    if same is None:
        started = f"the teacher {recorded}, which no longer exists" if recorded else "a teacher it did not record"
        _warn(f"--finetune {given}: the run of {path} started with {started}; the resumed run distils from "
              f"{given}, which must hold the same weights")
    elif not same:
        raise UserError(f"--finetune {given} is not the teacher the run of {path} started with ({recorded}, which "
                        "still exists): its checkpoints do not hold the teacher, so a resume loads it from --finetune "
                        f"and another file would change the teacher mid-run. Give --finetune {recorded} to continue "
                        "the run, or start a new run in another --output_dir to train with another teacher")


def same_file(recorded: str, given: str) -> Optional[bool]:
    """Whether two checkpoint arguments name the same weights: the same name, the same file, or files with
    the same bytes; None when the recorded file no longer exists (it may have moved)."""
    if is_named(recorded) or is_named(given):
        return recorded == given
    if not os.path.isfile(recorded):
        return None
    if not os.path.isfile(given):
        return False
    return os.path.samefile(recorded, given) or filecmp.cmp(recorded, given, shallow=False)


def _warn(message: str) -> None:
    if is_main_process():
        warnings.warn(message, UserWarning, stacklevel=3)


def next_position(ckpt: dict) -> tuple[int, int]:
    """(epoch, step) at which training continues after this checkpoint, in its own batch size."""
    if ckpt.get('step') is None:
        return ckpt['epoch'] + 1, 0
    return ckpt['epoch'], ckpt['step']


def start_epoch(ckpt: Optional[dict], default: int) -> int:
    """The epoch a training run resuming ``ckpt`` starts at (``default`` when it resumes none)."""
    return next_position(ckpt)[0] if ckpt is not None else default


def samples_done(ckpt: dict) -> int:
    """Samples of the checkpoint's epoch consumed over all ranks (0 for an end-of-epoch checkpoint).

    The distributed sampler deals one permutation of the epoch round-robin over the ranks, so after
    k steps of batch b on w ranks exactly the first k * b * w positions of that permutation are done,
    whatever b and w were. Checkpoints written before 'samples' was recorded hold the step and args."""
    if ckpt.get('step') is None:
        return 0
    if 'samples' in ckpt:
        return int(ckpt['samples'])
    args = ckpt.get('args') or {}
    return int(ckpt['step']) * int(args.get('batch_size', 0)) * int(args.get('world_size', 1) or 1)


def resume_step(ckpt: dict, path: str, batch_size: int, world_size: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) at which this run, with its own batch size and number of ranks, continues ``ckpt``.

    Exact when the samples done are a whole number of this run's steps: its step s covers the same
    permutation positions as the saved run's. Otherwise continuing would train samples twice or skip
    some, so it is refused. When nothing of the epoch is left (the saved run stopped at or past where
    this run's epoch ends) the step is ``steps_per_epoch``: the epoch only needs its end (checkpoint,
    evaluation, log line)."""
    epoch, step = next_position(ckpt)
    if step == 0:
        return epoch, 0
    done = samples_done(ckpt)
    per_step = batch_size * world_size
    if done >= steps_per_epoch * per_step:
        return epoch, steps_per_epoch
    if done == 0 or done % per_step:
        saved_args = ckpt.get('args') or {}
        saved_batch, saved_world = saved_args.get('batch_size'), ckpt.get('world_size', saved_args.get('world_size'))
        fitting = [b for b in range(1, done + 1) if done % (b * world_size) == 0][-4:]
        raise UserError(
            f"--resume {path}: the checkpoint stopped after {done} samples of epoch {epoch} (--batch_size "
            f"{saved_batch} on {saved_world} rank(s)); with --batch_size {batch_size} on {world_size} rank(s) "
            f"({per_step} samples a step) that is not a whole number of steps, so the rest of the epoch cannot "
            f"continue without training some samples twice or skipping some. Resume with --batch_size "
            f"{saved_batch} on {saved_world} rank(s)"
            + (f", or a --batch_size that divides it on {world_size} rank(s) ({', '.join(map(str, fitting))})"
               if fitting else '')
            + ", or from an end-of-epoch checkpoint (checkpoint-<epoch>.pth).")
    return epoch, done // per_step


def restore_weights(ckpt: dict, path: str, model, model_ema) -> None:
    """The student, the teacher (copy modes) and the EMA student from a checkpoint."""
    load_exact(model.student, ckpt['model'], f"checkpoint {path!r} (model)")
    if 'teacher' in ckpt and model.teacher is not None:
        load_exact(model.teacher, ckpt['teacher'], f"checkpoint {path!r} (teacher)")
    if model_ema is not None:
        if 'model_ema' not in ckpt:
            raise UserError(f"--ema is set but {path!r} holds no model_ema: resume without --ema, or from a run "
                            "that kept one")
        load_exact(model_ema.module, ckpt['model_ema'], f"checkpoint {path!r} (model_ema)")


def describe_checkpoint(path: str, epoch: int, step: Optional[int]) -> str:
    """'PATH (end of epoch E)' or 'PATH (epoch E, step S)', for messages."""
    return f"{path} ({f'end of epoch {epoch}' if step is None else f'epoch {epoch}, step {step}'})"


def last_good_sentence(last_good: Optional[str]) -> str:
    if last_good is None:
        return "this run has written no checkpoint yet and resumed none."
    return f"the last good checkpoint is {last_good}."


# ---- what a checkpoint holds -------------------------------------------------------------------------
def recorded_args(ckpt: Optional[dict]) -> dict:
    """The run's flags and resolved values as the checkpoint records them ({} when it records none, e.g. MAE's
    checkpoints, whose args are a Namespace)."""
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    return saved if isinstance(saved, dict) else {}


def holds_teacher(ckpt: Optional[dict]) -> bool:
    """Whether the checkpoint holds the teacher's weights (copy modes' checkpoints do)."""
    return ckpt is not None and 'teacher' in ckpt


def holds_ema(ckpt: Optional[dict]) -> bool:
    return ckpt is not None and 'model_ema' in ckpt


def read_position(path: str) -> Optional[dict]:
    """A checkpoint's ``epoch`` and ``step`` (memory-mapped, tensors not read), or None when it records no epoch
    (weights only): this project's format, or MAE's / DeiT's (their args are an argparse.Namespace). Raises on a
    file torch cannot read."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        return None
    return {'epoch': ckpt['epoch'], 'step': ckpt.get('step')}


def describe_position(ckpt: dict) -> str:
    """'end of epoch E' or 'epoch E, step S' of a checkpoint (or of ``read_position``'s answer)."""
    epoch, step = saved_position(ckpt)
    return f"end of epoch {epoch}" if step is None else f"epoch {epoch}, step {step}"


def student_weights(ckpt: dict, ema: bool = False) -> dict:
    """The student's state dict (``ema``: the EMA student's)."""
    return ckpt['model_ema' if ema else 'model']


def saved_position(ckpt: dict) -> tuple[int, Optional[int]]:
    """(epoch, step) as saved: ``step`` None at the end of the epoch."""
    return ckpt['epoch'], ckpt.get('step')


def best_record(ckpt: Optional[dict]) -> Optional[dict]:
    """The best accuracies so far and their epochs (``BestAccuracy``'s state)."""
    return ckpt.get('best') if ckpt is not None else None


def end_of_epoch_stats(ckpt: Optional[dict]) -> Optional[dict]:
    """The epoch's training means held by an end-of-epoch checkpoint (None for any other)."""
    if ckpt is None or ckpt.get('step') is not None:
        return None
    return ckpt.get('epoch_stats')


def describe_saved(path: str, ckpt: dict) -> str:
    """``describe_checkpoint`` of a checkpoint read from ``path``."""
    return describe_checkpoint(path, *saved_position(ckpt))


# ---- the checkpointer -----------------------------------------------------------------------------------
class Stateful(Protocol):
    """A checkpoint component: what torch's optimizers and grad scalers already are."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class Weights:
    """A module as a checkpoint component, loaded with util.pretrained.load_exact: a checkpoint that does not
    fit names its missing, unexpected and mis-shaped keys. ``if_missing`` says what to do when a resumed
    checkpoint lacks the entry (None: the entry is optional, e.g. a teacher also read from --finetune);
    ``frozen`` weights (a teacher) are not checked for NaN before a save, as training does not change them."""

    def __init__(self, module: torch.nn.Module, if_missing: Optional[str] = '', frozen: bool = False) -> None:
        self.module, self.if_missing, self.frozen = module, if_missing, frozen

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, source: str = 'checkpoint') -> None:
        load_exact(self.module, state, source)


class ResumePoint(NamedTuple):
    """Where a resumed run continues: its epoch and step (in this run's batch size and ranks), this rank's
    generator states to continue a mid-epoch checkpoint with, and the epoch's loss sums so far."""
    epoch: int
    step: int
    rng: Optional[dict]
    partial: Optional[dict]


class Checkpointer:
    """Owns the run's checkpoints in ``output_dir`` (as torchtitan's CheckpointManager): ``save`` writes the
    named ``components`` (each entry's ``state_dict()``) with the position, the run's ``record`` and every rank's
    generator states into ``checkpoint.pth`` (and, before it, the epoch's numbered checkpoint every
    ``save_every`` epochs and at the last, and ``checkpoint-best.pth``), on rank 0, atomically, never a state
    holding NaN or infinity; ``load`` restores the components and says where the run continues. ``last_good``
    names the last checkpoint written or resumed, for messages. It knows nothing of what the components are."""

    def __init__(self, output_dir: str, components: dict[str, Stateful | Weights], record: dict,
                 device: torch.device, epochs: int, save_every: int, last_good: Optional[str] = None) -> None:
        self.output_dir, self.components, self.record, self.device = output_dir, components, record, device
        self.epochs, self.save_every, self.last_good = epochs, save_every, last_good

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT)

    def keeps_numbered(self, epoch: int) -> bool:
        """Whether ``epoch`` keeps its own checkpoint-<epoch>.pth: every ``save_every`` epochs and the last."""
        return bool(self.save_every) and ((epoch + 1) % self.save_every == 0 or epoch + 1 == self.epochs)

    def size(self) -> int:
        """About the size of one checkpoint: the modules' tensors and the optimizers' state (AdamW: two moments
        per trained parameter)."""
        weights = sum(t.numel() * t.element_size() for c in self.components.values() if isinstance(c, Weights)
                      for t in c.state_dict().values())
        moments = sum(p.numel() * p.element_size() for c in self.components.values()
                      if isinstance(c, torch.optim.Optimizer) for g in c.param_groups for p in g['params'])
        return weights + 2 * moments

    def state_dict(self, epoch: int, step: Optional[int], best: dict, partial: Optional[dict] = None,
                   epoch_stats: Optional[dict] = None) -> dict:
        """The components and the position in the format of this module's docstring. Collective: every rank
        calls it (each rank's generator states are gathered)."""
        world = get_world_size()
        rngs = all_gather_object(rng_state())  # every rank's: a resume on as many ranks restores each its own
        out = {name: component.state_dict() for name, component in self.components.items()}
        out.update({'epoch': epoch, 'step': step, 'args': self.record, 'rng': rngs[0], 'rng_per_rank': rngs,
                    'world_size': world, 'best': best})
        if step is not None:
            out['samples'] = step * self.record['batch_size'] * world
            out['partial_epoch'] = partial
        elif epoch_stats is not None:
            out['epoch_stats'] = epoch_stats
        return out

    def save(self, epoch: int, step: Optional[int], best: dict, partial: Optional[dict] = None,
             epoch_stats: Optional[dict] = None, with_best: bool = False) -> bool:
        """checkpoint.pth after the epoch's numbered checkpoint (at an epoch's end, when kept) and
        checkpoint-best.pth (``with_best``): the record of checkpoint.pth (its best accuracies) never points at a
        file that was not written. Nothing is written when any rank's state holds NaN or infinity (that raises),
        nor without an output folder. Returns whether the checkpoint was written."""
        if not self.output_dir:
            return False
        state = self.state_dict(epoch, step, best, partial, epoch_stats)
        checked = [name for name, c in self.components.items() if not getattr(c, 'frozen', False)]
        check_finite(state, checked, describe_checkpoint(self.path, epoch, step), self.last_good, self.device)
        if is_main_process():
            names = ([numbered(epoch)] if step is None and self.keeps_numbered(epoch) else []) \
                + ([BEST] if with_best else [])
            for name in names:
                save_atomic(state, os.path.join(self.output_dir, name))
            save_atomic(state, self.path)
        barrier()
        self.last_good = describe_checkpoint(self.path, epoch, step)
        return True

    def load(self, ckpt: dict, path: str, batch_size: int, steps_per_epoch: int, seed: int, data: dict) -> ResumePoint:
        """The components and the position from ``ckpt`` (read from ``path``). A mid-epoch checkpoint continues
        only with the same training set (``data``: its ``dataset_fingerprint``) and ``seed``."""
        for name, component in self.components.items():
            self._load_component(name, component, ckpt, path)
        world = get_world_size()
        epoch, step = resume_step(ckpt, path, batch_size, world, steps_per_epoch)
        rng = resume_rng(ckpt, get_rank(), world, batch_size) if step else None
        partial = ckpt.get('partial_epoch') if step else None
        if step:
            check_same_permutation(recorded_args(ckpt), path, seed, data, epoch)
        self.last_good = describe_saved(path, ckpt)
        log(f"resumed from {path}: epoch {epoch}, step {step}"
            + (f" of {steps_per_epoch} ({samples_done(ckpt)} samples of the epoch done)" if step else ''))
        return ResumePoint(epoch, step, rng, partial)

    @staticmethod
    def _load_component(name: str, component: Stateful | Weights, ckpt: dict, path: str) -> None:
        weights = isinstance(component, Weights)
        if name not in ckpt:
            if weights and component.if_missing is None:
                return
            hint = component.if_missing if weights and component.if_missing else \
                "resume from a checkpoint of a run that kept it, or without --resume"
            raise UserError(f"--resume {path!r} holds no {name}, which this run needs: {hint}")
        if weights:
            component.load_state_dict(ckpt[name], f"checkpoint {path!r} ({name})")
        else:
            component.load_state_dict(ckpt[name])
