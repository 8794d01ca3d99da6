"""Command-line helpers shared by the scripts."""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from models_component_init import parse_components
from models_pair import ModelArgumentError
from util.config import Config
from util.datasets import CACHE_IMAGES_HELP, LAYOUT, DataError
from util.errors import UserError
from util.eval_classes import read_eval_classes
from util.precision import AMP_DTYPES
from util.pretrained import local_checkpoint
from util.run_record import command_line


def parse_kwargs(items: Sequence[str] | dict, flag: str) -> dict:
    """``['patch_size=4', 'qk_norm=True']`` -> ``{'patch_size': 4, 'qk_norm': True}`` (values as Python literals)."""
    if isinstance(items, dict):
        return items
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UserError(f"{flag}: {item!r} is not KEY=VALUE (e.g. {flag} patch_size=4 embed_dim=192)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The destinations the command line set explicitly (to apply a mode's own defaults to the rest)."""
    probe = copy.deepcopy(parser)  # parent parsers share their actions: never touch the original's defaults
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults.clear()
    namespace, _ = probe.parse_known_args(argv)
    return sorted(vars(namespace))


CONFIG_HELP = ('a YAML file of flag values (e.g. a recipe under recipes/, or a run\'s config.yaml): its values '
               'become the defaults, the command line wins')


class Parser(argparse.ArgumentParser):
    """The scripts' parser: flags only as spelled in full (``--epoch`` is not taken for ``--epochs``), and a
    command-line mistake in one ``error:`` line that names the closest flags (the usage is in ``--help``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def options(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith('--')]

    def closest(self, word: str) -> list[str]:
        return difflib.get_close_matches(word.split('=')[0], self.options(), n=3, cutoff=0.6)

    def error(self, message: str) -> None:
        unknown = re.match(r'unrecognized arguments: (.*)', message)
        hints = []
        if unknown:
            for word in (w for w in unknown.group(1).split() if w.startswith('--')):
                close = self.closest(word)
                hints.append(f"{word.split('=')[0]}: did you mean {' or '.join(close)}?" if close
                             else f"{word.split('=')[0]}: no such flag")
        text = '; '.join(hints) if hints else message
        self.exit(2, f"{self.prog}: error: {text}\n{self.prog}: the flags and their defaults: --help\n")


def read_config(path: str, parser: Parser) -> dict:
    """--config FILE: the flag values a YAML mapping gives, checked against ``parser``'s flags (names, choices,
    types), as defaults."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror}); give a YAML file of flag values") from e
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: holds a {type(values).__name__}, not a mapping of flag names to values "
                        "(e.g. `epochs: 100`)")
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    unknown = [k for k in values if k not in actions]
    if unknown:
        advice = '; '.join(f"{k}: did you mean {' or '.join(c)}?" if (c := difflib.get_close_matches(
            str(k), list(actions), n=3, cutoff=0.6)) else f"{k}: no such flag" for k in unknown)
        raise UserError(f"--config {path}: unknown flag names ({advice}); the keys are the flags without '--'")
    return {k: config_value(path, actions[k], v) for k, v in values.items()}


def config_value(path: str, action: argparse.Action, value: Any) -> Any:
    """A config file's value as the flag's own type would parse it, within its choices."""
    def one(v: Any) -> Any:
        if action.type is not None and isinstance(v, str):
            try:
                v = action.type(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise UserError(f"--config {path}: {action.dest}: {v!r} is not a valid value ({e})") from e
        elif action.type in (int, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = action.type(v)
        if action.choices is not None and v not in action.choices and not (v is None and action.default is None):
            choices = ', '.join(map(str, action.choices))
            raise UserError(f"--config {path}: {action.dest}: {v!r} is not one of {choices}")
        return v
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    return [one(v) for v in value] if many and isinstance(value, list) else one(value)


def usable_workers(requested: int) -> int:
    """--num_workers, lowered (with one line) to the CPUs this process may run on: more loader processes than
    CPUs only compete (and PyTorch warns about each loader)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if requested > cpus:
        from util.distributed import log

        log(f"--num_workers {requested}: this process may use {cpus} CPUs; loading with {cpus} workers")
        return cpus
    return requested


def flag_names(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The destinations of a parser's flags (what a --config file may set)."""
    return tuple(a.dest for a in parser._actions if a.option_strings and a.dest not in ('help', 'config'))


def parse_command(parser: Parser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags of ``argv`` with --config's values as defaults, and the flags given explicitly (on the
    command line or in the config file: a mode's defaults apply to the others only)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--config', default=None)
    known, _ = pre.parse_known_args(argv)
    values = read_config(known.config, parser) if known.config else {}
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    return args, sorted(set(explicit_flags(parser, argv)) | set(values))


def run_command(parser: Parser, script: str, main: Callable[[Config], dict], argv: Sequence[str] | None) -> dict:
    """An entry point's run: ``argv`` parsed by ``parser`` (with --config's values) into the configuration,
    which records the flags given and the command line of ``script``, and ``main`` run on it."""
    args, given = parse_command(parser, argv)
    return main(Config.of(args, explicit_flags=given, command=command_line(script, argv)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default (unless its help already states it) and the description
    as written. Flags without a value (store_true / store_false) are off unless given, so they show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.nargs == 0 or 'default' in text or action.default is argparse.SUPPRESS:
            return text
        return text + ' (default: %(default)s)'


def annotate_mode_defaults(parser: argparse.ArgumentParser, defaults: dict, mode: str) -> None:
    """Add "MODE: VALUE" to the default shown in the help of each option that ``mode`` changes.

    (argparse lists its actions only in the private ``_actions``, which explicit_flags reads too.)"""
    for action in parser._actions:
        if action.dest in defaults and action.help:
            note = f"--mode {mode}: {defaults[action.dest]}"
            if 'default' in action.help:
                action.help = action.help + f' ({note})'
            elif action.nargs == 0:  # a flag sharing its dest (--cls_token): the dest's default is not the flag's
                state = 'on' if defaults[action.dest] == action.const else 'off'
                action.help = action.help + f" (--mode {mode}: {state})"
            else:
                action.help = action.help + f' (default: %(default)s; {note})'


# ---- the flag groups main_finetune.py and main_pretrain.py share ---------------------------------------------
def add_loader_arguments(group: argparse._ArgumentGroup, jpeg_draft: bool) -> None:
    """The data loader's flags of the 'data' group; ``jpeg_draft``: with --no_jpeg_draft (main_finetune.py's
    transforms decode JPEGs in draft mode)."""
    group.add_argument('--num_workers', default=10, type=int,
                       help='data loading processes per GPU; they persist across epochs and are re-seeded per epoch')
    if jpeg_draft:
        group.add_argument('--no_jpeg_draft', action='store_false', dest='jpeg_draft',
                           help='decode JPEGs at full resolution; by default the crop is chosen from the header\'s '
                                'size and the decoder reduces the scale (1/2 to 1/8) as far as the crop still covers '
                                'the output size (same crops and random draws; pixels within about one grey level)')
    group.add_argument('--cache_images', action='store_true', help=CACHE_IMAGES_HELP)
    group.add_argument('--pin_mem', action='store_true',
                       help='pin CPU memory in the DataLoader for more efficient transfer to GPU (default)')
    group.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin CPU memory')
    group.set_defaults(pin_mem=True)


def add_lr_arguments(group: argparse._ArgumentGroup, blr: float) -> None:
    """--lr and --blr (the absolute lr, or the base lr it is scaled from), of the 'optimizer' group."""
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate (absolute lr; default: --blr x effective batch size / 256)')
    group.add_argument('--blr', type=float, default=blr, metavar='LR',
                       help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')


def add_amp_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                       help='mixed precision: bf16 (default on CUDA, no loss scaling), fp16 (with a grad scaler), '
                            'none (default on CPU)')


def add_run_arguments(parser: argparse.ArgumentParser, task: str, resume_help: str,
                      after_resume: Callable[[argparse._ArgumentGroup], None] = lambda g: None,
                      after_save_every: Callable[[argparse._ArgumentGroup], None] = lambda g: None) -> None:
    """The 'run' group: output folders, device, seed, resume, checkpoints and the loss lines. ``task`` is what
    --device runs ('training'); the script's own flags of the group go after --resume and after --save_every."""
    g = parser.add_argument_group('run')
    g.add_argument('--config', default=None, metavar='FILE', help=CONFIG_HELP)
    g.add_argument('--output_dir', default='./output_dir', help='where to save checkpoints and log.txt; empty: none')
    g.add_argument('--log_dir', default=None, help='where to write TensorBoard events (default: --output_dir)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help=f'device to use for {task} (default: cuda when available)')
    g.add_argument('--seed', default=0, type=int, help='random seed')
    g.add_argument('--resume', default='', help=resume_help)
    after_resume(g)
    g.add_argument('--save_every', default=20, type=int,
                   help='also keep checkpoint-<epoch>.pth every N epochs and at the end (0: only checkpoint.pth)')
    after_save_every(g)
    g.add_argument('--print_freq', default=20, type=int,
                   help='print and log the loss every N steps; mid-epoch checkpoints and preemption stops '
                        'happen at these steps too')
    g.add_argument('--checkpoint_minutes', default=10, type=float,
                   help='also write checkpoint.pth inside an epoch every N minutes (0: only at epoch ends), so a '
                        'preempted or crashed job loses at most that much training')


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('distributed')
    g.add_argument('--world_size', default=1, type=int, help='number of distributed processes (set by torchrun)')
    g.add_argument('--local_rank', default=-1, type=int, help='ignored; torchrun passes LOCAL_RANK')
    g.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    g.add_argument('--dist_timeout', default=30, type=int,
                   help='minutes a collective may wait before the job fails (a hung rank ends the job)')


def check_range(flag: str, value: float, low: float, high: float, low_open: bool = False,
                 high_open: bool = False, meaning: str = '') -> None:
    """Raise a UserError naming ``flag`` unless ``value`` lies in the interval (open ends as given)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"--{flag} {value:g}: must lie in {interval}" + (f" ({meaning})" if meaning else ''))


def check_positive(flag: str, value: float, meaning: str = '') -> None:
    """Raise a UserError naming ``flag`` unless ``value`` is a finite number above 0."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--{flag} {value:g}: must be > 0" + (f" ({meaning})" if meaning else ''))


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """--mean / --std as given: finite fractions of the pixel range (ToTensor scales pixels to [0, 1]);
    a std must be above 0. Values above 1 are pixel units (0-255): the fix divides them by 255."""
    for flag, values in (('mean', mean), ('std', std)):
        if values is None:
            continue
        shown = ' '.join(f"{v:g}" for v in values)
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--{flag} {shown}: must be finite numbers (e.g. ImageNet's --mean 0.485 0.456 0.406 "
                            "--std 0.229 0.224 0.225)")
        if flag == 'std' and min(values) <= 0:
            raise UserError(f"--std {shown}: every std must be > 0 (inputs are divided by it); ImageNet's is "
                            "--std 0.229 0.224 0.225")
        if min(values) < 0 or max(values) > 1:
            fix = (f"; in pixel units (0-255)? divide by 255: --{flag} "
                   + ' '.join(f"{v / 255:.3f}" for v in values) if max(values) > 1 else '')
            raise UserError(f"--{flag} {shown}: must lie in [0, 1], as fractions of the pixel range (images are "
                            f"scaled to [0, 1] before normalisation){fix}")


def check_values(args) -> None:
    """main_finetune.py's numeric flags that no run can use, rejected before anything is loaded."""
    if not args.eval and args.epochs <= 0:
        raise UserError(f"--epochs {args.epochs}: must be >= 1 (the total number of epochs to train; to only "
                        "evaluate a checkpoint use --eval --resume CKPT)")
    if not math.isfinite(args.atd_weight) or args.atd_weight < 0:
        raise UserError(f"--atd_weight {args.atd_weight:g}: the weight of the attention distillation loss must be "
                        "finite and >= 0 (the seed's distill recipe uses 3)")
    check_range('drop_path', args.drop_path, 0, 1, high_open=True, meaning='a stochastic-depth rate; 1 drops every '
                 'block')
    check_range('smoothing', args.smoothing, 0, 1, high_open=True, meaning='label smoothing; 1 leaves no label')
    check_range('min_crop_scale', args.min_crop_scale, 0, 1, low_open=True,
                 meaning='the smallest area fraction of the random-resized crop')
    check_range('hflip', args.hflip, 0, 1, meaning='a probability')
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be >= 1 (images per GPU and step)")
    if args.lr is not None:
        check_positive('lr', args.lr, 'the absolute learning rate, e.g. --lr 1e-3; or leave it out and set --blr')
    check_positive('blr', args.blr, 'the base learning rate, scaled by the effective batch size / 256')
    check_normalization(args.mean, args.std)


def check_data_folders(eval_data_path: str, data_path: str, trains_on_labels: bool, hint: str = '') -> None:
    """The evaluation split, and the training split when the run trains on labels, exist (``hint``: where the
    mode's data go, added to the message without --data_path)."""
    if not eval_data_path:
        raise UserError("give --data_path: a folder holding train/<class>/ and val/<class>/" + hint)
    splits = [(eval_data_path, 'val')]
    if trains_on_labels:
        splits.append((data_path, 'train'))
    for root, split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{split} data not found: {os.path.join(root, split)!r} is not a directory. "
                            f"Expected the layout {LAYOUT}.")


def check_run_flags(cfg, mode, has_teacher_weights: bool, resumes: bool) -> None:
    """Flags that this run cannot use together, refused before anything is loaded, then those of the experiments
    (``check_experiment_flags``)."""
    if mode.needs_teacher(cfg.eval) and not cfg.finetune and not has_teacher_weights:
        raise UserError(f"mode {mode.name} needs the teacher's weights: --finetune PATH ({mode.teacher_hint})")
    mode.check_flags(cfg)
    if not 0.0 < cfg.eval_crop_pct <= 1.0:
        raise UserError(f"--eval_crop_pct {cfg.eval_crop_pct}: the crop fraction must be in (0, 1] (1.0: evaluate "
                        "the image at the input size, uncropped; 0.875: MAE's ImageNet evaluation)")
    if cfg.save_best == 'ema' and cfg.ema is None and not cfg.eval:
        raise UserError("--save_best ema keeps the checkpoint of the best EMA top-1, but there is no EMA: add --ema "
                        "DECAY (e.g. --ema 0.9999), or use --save_best (raw weights)")
    if cfg.ensemble_with and not cfg.eval:
        raise UserError("--ensemble_with is an evaluation: add --eval (and --resume CKPT for the first model)")
    if cfg.eval and not resumes and not cfg.finetune:
        raise UserError("--eval needs a checkpoint: --resume CKPT (or --finetune CKPT for pre-trained weights)")
    if cfg.mixup_active and cfg.batch_size % 2:
        raise UserError("mixup/cutmix pair up the images of a batch: --batch_size must be even "
                        f"(got {cfg.batch_size})")
    if cfg.accum_iter < 1 or cfg.print_freq < 1 or cfg.eval_every < 1:
        raise UserError("--accum_iter, --print_freq and --eval_every must be >= 1")
    check_experiment_flags(cfg, mode)


def check_experiment_flags(cfg, mode) -> None:
    """--student_init (transfer and distillation modes; its file or name resolved now) and --eval_classes (an
    evaluation's, of classes the model has)."""
    if cfg.student_init and not cfg.eval:
        if not mode.student_init:
            raise UserError(f"--student_init initialises the student of a transfer or distillation mode; --mode "
                            f"{mode.name} takes its starting weights from --finetune: use that instead")
        local_checkpoint(cfg.student_init, '--student_init')  # a name is resolved here, a missing file refused
    if cfg.init_from_teacher and not cfg.eval:
        check_init_from_teacher(cfg, mode)
    if cfg.eval_classes:
        if not cfg.eval:
            raise UserError("--eval_classes restricts an evaluation's logits: add --eval (and --resume CKPT)")
        read_eval_classes(cfg.eval_classes, cfg.nb_classes)


def check_init_from_teacher(cfg, mode) -> None:
    """--init_from_teacher: known component names, a mode whose student starts from random weights beside a teacher,
    and no --student_init (both would give the student's starting weights)."""
    try:
        parse_components(cfg.init_from_teacher)
    except ModelArgumentError as e:
        raise UserError(f"--init_from_teacher {cfg.init_from_teacher}: {e}") from e
    if not mode.student_init:
        raise UserError(f"--init_from_teacher {cfg.init_from_teacher}: --mode {mode.name} has no randomly initialised "
                        "student beside a teacher to copy components into (transfer and distillation modes have); "
                        "drop --init_from_teacher, or pick such a mode")
    if cfg.student_init:
        raise UserError(f"--init_from_teacher {cfg.init_from_teacher} with --student_init {cfg.student_init}: both "
                        "give the student's starting weights, and the teacher's components would overwrite part of "
                        "--student_init's; use one of them")
