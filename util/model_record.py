"""The run's model description (models_spec.ModelSpec): built once from the flags, recorded in every checkpoint,
read back from any checkpoint.

    describe_model    the one function that decides what model a run is: teacher and student architectures (the
                      student mirrors the teacher unless named), pairing, heads, normalisation, evaluation crop;
                      every model error said as an ``error:`` line that names the flag
    recorded_spec     the ModelSpec of a checkpoint: its args' ``model_spec`` entry, or, for checkpoints written before
                      it was recorded (revision 61197d7, 7d1a766, the reference's converted ones), the description
                      of the flags its ``args`` record, through describe_model
    classifier_of     the classifier a checkpoint argument holds (a named timm / hub model, a checkpoint of this
                      project, an MAE pre-training checkpoint): its architecture, classes, size, pooling and
                      normalisation
    rebuild           the model a checkpoint's spec describes, as it is evaluated
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models_component_init import Part, component_parts, parse_components
from models_pair import ModelArgumentError, TeacherStudentPair
from models_pairing import layer_pairs
from models_spec import Architecture, ModelSpec, student_architecture
from util.config import Config
from util.distributed import log
from util.errors import UserError
from util.pretrained import is_named, pool_of_state_dict, read_checkpoint, resolve_named, select_state_dict

DEFAULT_MODEL = 'vit_large_patch16'
SPEC_KEY = 'model_spec'
# The flags that set each builder argument a model error names.
ARGUMENT_FLAGS = {'input_size': '--input_size',
                  'layer_map': '--layer_map', 'transfer_layers': '--transfer_layers', 'end_layer': '--end_layer',
                  'transfer_heads': '--transfer_heads', 'map_average': '--map_average',
                  'transfer_loss': '--transfer_loss', 'probe_blocks': '--probe_blocks',
                  'feature_layer': '--feature_layer',
                  'attention_impl': '--attention_impl', 'window_size': '--window_size',
                  'global_blocks': '--global_blocks',
                  'student': '--student_model / --student_kwargs', 'teacher': '--model / --teacher_model / '
                  '--model_kwargs', 'architecture': '--model / --model_kwargs'}
# What checkpoints written before the model description was recorded held for flags they did not record.
LEGACY_DEFAULTS = {'model': None, 'mode': 'none', 'teacher_model': None, 'student_model': None, 'model_kwargs': {},
                   'student_kwargs': {}, 'input_size': 224, 'nb_classes': 1000, 'global_pool': True,
                   'transfer_layers': None, 'layer_map': None, 'end_layer': 0, 'share_drop_path': True,
                   'probe_blocks': None, 'eval_crop_pct': None, 'transfer_heads': None, 'map_average': 'none',
                   'transfer_loss': 'ce', 'kd_temperature': 4.0, 'mean': None, 'std': None, 'finetune': '',
                   'eval': False, 'attention_impl': 'explicit', 'feature_weight': 0.0, 'feature_layer': None}


@contextmanager
def flag_errors(role: str = '') -> Iterator[None]:
    """Model errors (ModelArgumentError, in the model's words) as UserErrors that name the flag; ``role``:
    the flags of an unnamed architecture error (``student`` or ``teacher``)."""
    try:
        yield
    except ModelArgumentError as e:
        argument = role if e.argument == 'architecture' and role else e.argument
        raise UserError(f"{ARGUMENT_FLAGS.get(argument, argument)}: {e}") from e


def describe_model(cfg: Config, mode) -> ModelSpec:
    """The run's model, from its resolved flags and its mode (``modes.Mode``): the teacher's architecture (the
    mode's), the student's (``student_architecture``), the pairing (the mode's, on the two models' structure),
    the input normalisation (--mean / --std, else the teacher's, else ImageNet's) and the evaluation crop; the
    pair is assembled once on the meta device, so that every incompatibility is reported now."""
    with flag_errors('teacher'):
        # without a teacher: the architecture the student mirrors
        teacher = mode.teacher_architecture(cfg.model, cfg.teacher_model, cfg.model_kwargs, cfg.global_pool,
                                            cfg.finetune)
    with flag_errors('student' if cfg.student_model else 'teacher'):
        student = student_architecture(teacher, cfg.student_model, cfg.student_kwargs, cfg.global_pool)
        s_meta = student.create_meta(cfg.nb_classes, cfg.input_size)
    with flag_errors('teacher'):
        t_meta = teacher.create_meta(cfg.nb_classes, cfg.input_size) if mode.uses_teacher else None
    pairing_flags = {flag: getattr(cfg, flag) for flag in mode.pairing_flags}
    with flag_errors('student'):
        spec = ModelSpec(mode=mode.name, student=student, num_classes=cfg.nb_classes, img_size=cfg.input_size,
                         teacher=teacher if mode.uses_teacher else None, mean=tuple(cfg.mean), std=tuple(cfg.std),
                         eval_crop_pct=cfg.eval_crop_pct, **mode.pairing(pairing_flags, s_meta, t_meta))
        with torch.device('meta'):
            mode.build_model(spec, attention_impl=cfg.attention_impl)
    return spec


def teacher_components(student: nn.Module, teacher: nn.Module, components: str,
                       pairs: Mapping[int, int]) -> list[Part]:
    """--init_from_teacher's parts of ``student``, each with the teacher tensor it starts from (block tensors from
    the paired block: ``pairs``, or where the pair has none, the default pairing), a misfit an ``error:`` line."""
    try:
        pairs = pairs or layer_pairs(None, len(student.blocks), len(teacher.blocks))
        return component_parts(student.state_dict(), teacher.state_dict(), parse_components(components), pairs)
    except ModelArgumentError as e:
        raise UserError(f"--init_from_teacher {components}: {e}") from e


def check_teacher_components(spec: ModelSpec, components: str) -> None:
    """--init_from_teacher fits the run's student and teacher (on the meta device, before anything is loaded)."""
    teacher_components(spec.student.create_meta(spec.num_classes, spec.img_size),
                       spec.teacher.create_meta(spec.num_classes, spec.img_size), components, spec.pair_map)


def read_recorded(path: str) -> Any:
    """A checkpoint's entries memory-mapped (tensors not read), for what it records about its model."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', mmap=True, weights_only=True)


def recorded_spec(ckpt: Any) -> Optional[ModelSpec]:
    """The ModelSpec a checkpoint records, or that its recorded flags describe (older checkpoints); None for a
    checkpoint that records neither (MAE's, DeiT's, timm's)."""
    if not isinstance(ckpt, dict):
        return None
    saved = ckpt.get('args')
    if not isinstance(saved, dict):
        return None
    if isinstance(saved.get(SPEC_KEY), dict):
        return ModelSpec.from_record(saved[SPEC_KEY])
    if 'model' not in saved:
        return None
    from modes import get_mode

    cfg = Config.of({**LEGACY_DEFAULTS, **saved})
    # the architectures as the flags name them (finetune: a probe run's teacher checkpoint may be gone)
    cfg = cfg.replace(model=cfg.model or DEFAULT_MODEL, teacher_model=cfg.teacher_model or cfg.model or DEFAULT_MODEL,
                      mean=list(cfg.mean or IMAGENET_DEFAULT_MEAN), std=list(cfg.std or IMAGENET_DEFAULT_STD),
                      attention_impl='explicit', finetune='')
    with flag_errors():
        return describe_model(cfg, get_mode(cfg.mode))


def classifier_of(spec: str, checkpoint: Any = None) -> Optional[ModelSpec]:
    """The classifier a checkpoint argument holds, as a plain model's ModelSpec (its student is the classifier):
    a named model (timm:NAME.tag, hf-hub:ORG/NAME: architecture, classes, input size, pooling and normalisation
    from its config; the pooling from its weights where the config has none), or a checkpoint of this project
    (its recorded spec's student; an MAE pre-training checkpoint's encoder). None when it says nothing."""
    if is_named(spec):
        named = resolve_named(spec)
        if named.architecture is not None:
            pool = named.global_pool or pool_of_state_dict(select_state_dict(read_checkpoint(named.path)))
            size = named.pretrained_cfg.get('input_size')
            return ModelSpec(mode='none', student=Architecture.of(named.architecture, named.model_args, pool),
                             num_classes=named.num_classes, img_size=size[-1] if size else 224,
                             mean=tuple(named.mean or IMAGENET_DEFAULT_MEAN),
                             std=tuple(named.std or IMAGENET_DEFAULT_STD))
        spec = named.path
    recorded = recorded_spec(checkpoint if checkpoint is not None else read_recorded(spec))
    if recorded is None:
        return None
    return ModelSpec(mode='none', student=recorded.student, num_classes=recorded.num_classes,
                     img_size=recorded.img_size, mean=recorded.mean, std=recorded.std,
                     eval_crop_pct=recorded.eval_crop_pct)


def finetune_defaults(cfg: Config, mode) -> dict:
    """What the --finetune checkpoint says about the run's model where the flags say nothing: a name (timm:,
    hub:) or a checkpoint of this project that records its model (e.g. main_pretrain.py's) gives the architecture
    when --model / --teacher_model are not set; a name, or the teacher of a mode that reads it from its checkpoint
    (probe), gives the input normalisation; evaluating a local classifier with an attention-pooling head pools
    with it. --mean / --std and an explicit --global_pool / --cls_token win. Returns the resolved values."""
    pool_given = 'global_pool' in (cfg.explicit_flags or ())
    evaluating_plain = cfg.eval and not mode.uses_teacher and not pool_given
    if cfg.eval and not is_named(cfg.finetune) and recorded_spec(read_recorded(cfg.finetune)) is not None:
        log(f"--eval --finetune {cfg.finetune}: its weights in the model these flags describe (resized to them); "
            f"--eval --resume {cfg.finetune} evaluates the model the checkpoint records, with its own sizes")
    unnamed = not cfg.model and not cfg.teacher_model
    values = {}
    if evaluating_plain and not is_named(cfg.finetune):
        if pool_of_state_dict(select_state_dict(read_checkpoint(cfg.finetune, '--finetune'))) == 'map':
            log(f"pooling: the attention-pooling head of --finetune {cfg.finetune}")
            values['global_pool'] = 'map'
        if not unnamed:
            return values
    if not (is_named(cfg.finetune) or mode.teacher_from_checkpoint or unnamed):
        return values
    source = classifier_of(cfg.finetune)
    if source is None:
        return values
    if unnamed:
        values.update(model=source.student.name, model_kwargs={**source.student.kwargs, **cfg.model_kwargs})
        log(f"architecture from --finetune {cfg.finetune}: {values['model']} {values['model_kwargs']}")
        if evaluating_plain:  # evaluating the named classifier as it is
            values['global_pool'] = source.student.global_pool
    if (is_named(cfg.finetune) or mode.teacher_from_checkpoint) and (cfg.mean is None or cfg.std is None):
        values.update(mean=cfg.mean or list(source.mean), std=cfg.std or list(source.std))
        log(f"input normalisation: mean {values['mean']}, std {values['std']} (the --finetune teacher's; --mean / "
            "--std override)")
    return values


# Flags a resumed run may change without a word: where the run's files go, how it is launched and reports.
UNREPORTED = {'resume', 'output_dir', 'log_dir', 'device', 'world_size', 'local_rank', 'dist_url', 'dist_timeout',
              'rank', 'gpu', 'distributed', 'dist_backend', 'explicit_flags', 'num_workers', 'pin_mem', 'print_freq',
              'start_epoch', 'eval', 'selection_pending', 'model_spec', 'train_data', 'lr', 'student_model',
              'student_kwargs', 'teacher_acc', 'run_record', 'command', 'config', 'student_init', 'init_from_teacher',
              'log_wandb', 'wandb_project', 'wandb_name'}


def spec_changes(saved: ModelSpec, now: ModelSpec) -> list[str]:
    """The fields in which two model descriptions differ, as 'field: saved -> now'."""
    before, after = saved.to_record(), now.to_record()
    return [f"{key}: {before[key]} -> {after[key]}" for key in before if before[key] != after.get(key)]


def check_resumed_model(ckpt: dict, path: str, spec: ModelSpec) -> None:
    """A training run continues the model its checkpoint describes: another architecture, pairing, heads, map
    averaging, attention map loss or temperature would change the run's model mid-way (and the checkpoint would
    then record the new one as if the whole run had used it). Refused, naming each difference."""
    saved = recorded_spec(ckpt)
    changes = spec_changes(saved, spec) if saved is not None else []
    if changes:
        raise UserError(f"--resume {path}: this command describes another model than the run it continues ("
                        + '; '.join(changes) + "). Give the run's own model flags to continue it, or start a new "
                        "run in another --output_dir")


def changed_flags(saved_args: dict, now_flags: dict) -> list[str]:
    """One line per flag whose value (``now_flags``: this run's flag values) differs from the resumed checkpoint's
    record (other than where the run writes and how it is launched): what a resumed run does differently from the
    run it continues."""
    lines = []
    for key, before in saved_args.items():
        now = now_flags.get(key, before)
        same = now == before or (isinstance(before, (list, tuple)) and list(before) == list(now or []))
        if key in UNREPORTED or same:
            continue
        lines.append(f"--{key}: {before} in the checkpoint's run, {now} from here on")
    return lines


# The model flags --eval --resume checks against the evaluated checkpoint's model.
EVALUATED_FLAGS = ('nb_classes', 'input_size', 'map_average', 'transfer_loss', 'mode', 'transfer_heads')


def check_evaluated_flags(explicit_flags, flags: dict, spec: ModelSpec) -> None:
    """--eval --resume takes its model from the checkpoint: an explicit model flag (``explicit_flags``: the flags
    the command line gave; ``flags``: their values) that says otherwise is refused with both values (instead of
    evaluating the checkpoint's model without a word)."""
    given = set(explicit_flags or ())
    recorded = {'nb_classes': spec.num_classes, 'input_size': spec.img_size, 'map_average': spec.map_average,
                'transfer_loss': spec.transfer_loss, 'mode': spec.mode}
    for flag, value in recorded.items():
        if flag in given and flags[flag] != value:
            raise UserError(f"--{flag} {flags[flag]}: the evaluated checkpoint's model has {flag} {value}, "
                            f"and --eval --resume evaluates that model: drop --{flag}")
    if 'transfer_heads' in given and flags['transfer_heads'] not in (None, ''):
        heads = 'all' if spec.heads is None else ','.join(map(str, spec.heads))
        raise UserError(f"--transfer_heads {flags['transfer_heads']}: the evaluated checkpoint transfers heads "
                        f"{heads}, "
                        "and --eval --resume evaluates that model: drop --transfer_heads")


def rebuild(spec: ModelSpec, attention_impl: str = 'explicit') -> TeacherStudentPair:
    """The model ``spec`` describes, as its checkpoints are evaluated (a distilled student alone, a copy student
    with its teacher), randomly initialised."""
    from modes import get_mode

    return get_mode(spec.mode).evaluated_as().build_model(spec, attention_impl=attention_impl)


def log_spec(spec: ModelSpec) -> None:
    log(f"model: {spec.mode} student {spec.student.name} {dict(spec.student.kwargs)}"
        + (f", teacher {spec.teacher.name} {dict(spec.teacher.kwargs)}" if spec.teacher else ''))
