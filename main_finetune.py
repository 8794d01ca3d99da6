"""Train a ViT student with attention transfer from a frozen teacher, or train / fine-tune a plain ViT.

    # attention distillation (the seed's recipe, 64 GPUs; here via torchrun on one node)
    torchrun --nproc_per_node 8 main_finetune.py --model dual_vit_large_patch16 --mode distill \\
        --end_layer -6 --atd_weight 3.0 --finetune mae_pretrain_vit_large.pth --data_path $IMAGENET ...
    # evaluate a checkpoint (model, mode and sizes come from the checkpoint)
    python main_finetune.py --eval --resume output_dir/checkpoint.pth --data_path $IMAGENET

Flow: arguments -> one read-only configuration (resolve_args, with the mode and the resumed checkpoint) ->
data -> the teacher-student pair (teacher weights) -> Trainer: optimizer, EMA, the checkpointer (resume) ->
epochs of train_one_epoch / checkpoint / evaluate -> log.txt and TensorBoard.
"""
from __future__ import annotations

import argparse
import os
from typing import NamedTuple

import torch
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from engine_finetune import Evaluator, TrainingStep, evaluate_ensemble
from models_attention import resolve_attention_impl
from models_component_init import COMPONENTS
from models_mae import is_mae_checkpoint
from models_pair import TeacherStudentPair
from models_spec import ModelSpec
from models_transfer_losses import FUSED_TRANSFER_LOSSES
from modes import (
    MODES,
    AttentionProbe,
    AttentionTransfer,
    Mode,
    get_mode,
    load_ensemble_member,
    load_initial_weights,
    restrict_to_qkv,
)
from util.args import (
    HelpFormatter,
    Parser,
    add_amp_argument,
    add_distributed_arguments,
    add_loader_arguments,
    add_lr_arguments,
    add_run_arguments,
    annotate_mode_defaults,
    check_data_folders,
    check_run_flags,
    check_values,
    flag_names,
    parse_kwargs,
    run_command,
    usable_workers,
)
from util.checkpoint import (
    BEST,
    Checkpointer,
    Weights,
    best_record,
    check_resume_matches,
    holds_ema,
    holds_teacher,
    load_training_checkpoint,
    next_position,
    recorded_args,
    restore_weights,
    seed_epoch,
    start_epoch,
    student_weights,
)
from util.config import Config
from util.datasets import DataError, DataSettings, build_loader, cache_decoded, pins_memory
from util.distributed import destroy, get_rank, get_world_size, init_distributed_mode, log, wrap_ddp
from util.errors import UserError, run_cli
from util.eval_classes import build_eval_dataset, restrict_classes
from util.lr_sched import Schedule, learning_rate
from util.model_record import (
    DEFAULT_MODEL,
    EVALUATED_FLAGS,
    changed_flags,
    check_evaluated_flags,
    check_resumed_model,
    check_teacher_components,
    describe_model,
    finetune_defaults,
    recorded_spec,
)
from util.output import (
    EVAL_RESULTS,
    INPUT_FLAGS,
    BestAccuracy,
    RunFolder,
    check_inputs_not_overwritten,
    check_output_folders,
    output_dir_in_use,
    requeued_checkpoint,
    resume_path,
    write_eval_results,
    write_log,
)
from util.precision import AMP_DTYPES, default_amp, hold_teacher, teacher_dtype
from util.pretrained import local_checkpoint
from util.run_control import reporting_stop, stop_on_signals
from util.run_loop import EpochEnd, RunLoop, RunParts, check_run_folder, finished
from util.run_record import Console
from util.samplers import ShardSampler, dataset_fingerprint
from util.tracking import add_tracking_arguments, check_wandb


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('Attention transfer / ViT fine-tuning', add_help=False)
    p.add_argument('--batch_size', default=64, type=int,
                   help='batch size per GPU (effective batch size is batch_size * accum_iter * # gpus)')
    p.add_argument('--epochs', default=50, type=int,
                   help='number of training epochs (probe mode without --epochs: derived from --presentations)')
    p.add_argument('--accum_iter', default=1, type=int,
                   help='accumulate gradients over this many iterations (a larger effective batch in less memory)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, type=str, metavar='MODEL',
                   help='architecture of teacher and student: a dual name (dual_vit_large_patch16), an MAE name '
                        '(vit_large_patch16) or any timm ViT name; plain training without --mode (default: the '
                        'architecture a --finetune name gives, e.g. timm:NAME or hf-hub:ORG/NAME, else '
                        f'{DEFAULT_MODEL})')
    g.add_argument('--teacher_model', default=None, type=str,
                   help='timm name of the teacher architecture, when it differs from --model '
                        '(e.g. vit_base_patch14_dinov2); the student mirrors it unless --student_model is given')
    g.add_argument('--student_model', default=None, type=str,
                   help='timm name of a student architecture other than the teacher\'s (attention modes need '
                        'the same heads and tokens in transferred layers)')
    g.add_argument('--model_kwargs', default={}, nargs='*', type=str, metavar='KEY=VALUE',
                   help='timm architecture arguments of the teacher (or plain model) and the mirrored student, '
                        'e.g. patch_size=4 embed_dim=192 depth=6 num_heads=3')
    g.add_argument('--student_kwargs', default={}, nargs='*', type=str, metavar='KEY=VALUE',
                   help='timm architecture arguments of the student on top of (or, with --student_model, instead '
                        'of) --model_kwargs, e.g. embed_dim=128 num_heads=2')
    g.add_argument('--input_size', default=224, type=int, help='image input size')
    g.add_argument('--drop_path', type=float, default=0.1, metavar='PCT', help='drop path rate (default: 0.1)')
    g.add_argument('--global_pool', action='store_true', help='average-pool the tokens + fc_norm (default)')
    g.set_defaults(global_pool=True)
    g.add_argument('--cls_token', action='store_false', dest='global_pool',
                   help='use the class token instead of global pooling for classification')

    g = p.add_argument_group('attention transfer')
    g.add_argument('--mode', default='none', type=str, choices=list(MODES),
                   help='attention transfer mode; none trains a plain ViT; probe: Attention Probe distillation, '
                        'which sets every one of ' + ', '.join(f'--{k}' for k in MODES['probe'].defaults) + ' that the '
                        'command line leaves unset to the reference\'s recipe (shown as "--mode probe: VALUE") '
                        '(default: %(default)s)')
    AttentionTransfer.add_arguments(g)

    g = p.add_argument_group('speed and memory')
    g.add_argument('--grad_checkpointing', action='store_true',
                   help='recompute each student block in the backward pass instead of storing its activations '
                        '(less memory, about one more forward of time); same losses and gradients')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the teacher and student blocks (the first steps compile); same losses and '
                        'gradients up to float rounding')
    g.add_argument('--teacher_dtype', default='auto', choices=['auto', 'float32', 'bf16'],
                   help='the frozen teacher\'s weights in memory: bf16 halves them (a ViT-g or 7B teacher beside a '
                        'ViT-L student on one GPU), and needs --amp bf16, whose matrix products read them in bf16 '
                        'anyway; auto: bf16 with --amp bf16 (the default on CUDA), else float32')

    AttentionProbe.add_arguments(p)

    g = p.add_argument_group('optimizer')
    g.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
    g.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    add_lr_arguments(g, blr=1e-3)
    g.add_argument('--beta2', type=float, default=0.999, metavar='BETA2', help='beta_2 of AdamW')
    g.add_argument('--layer_decay', type=float, default=0.75, help='layer-wise lr decay from ELECTRA/BEiT')
    g.add_argument('--min_lr', type=float, default=1e-6, metavar='LR',
                   help='lower lr bound for cyclic schedulers that hit 0')
    g.add_argument('--sched', default='cosine', choices=['cosine', 'step'],
                   help='lr schedule after warmup: half-cycle cosine to --min_lr (MAE), or steps of --step_rate at '
                        '--step_epochs (the Attention Probe reference; the default in probe mode)')
    g.add_argument('--step_epochs', default=[200, 300], type=int, nargs='+', metavar='EPOCH',
                   help='--sched step: epochs (counted from 1, as the reference) from which the lr is multiplied by '
                        '--step_rate (default: 200 300, the reference\'s)')
    g.add_argument('--step_rate', default=0.1, type=float, help='--sched step: lr factor at each step epoch')
    g.add_argument('--warmup_epochs', type=int, default=5, metavar='N', help='epochs to warm up the lr')
    g.add_argument('--ema', default=None, type=float, metavar='ALPHA',
                   help='EMA decay of the student (default: None, no EMA); evaluated beside the raw weights')
    add_amp_argument(g)

    g = p.add_argument_group('augmentation')
    g.add_argument('--color_jitter', type=float, default=None, metavar='PCT',
                   help='color jitter factor (enabled only when not using Auto/RandAug)')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                   help='AutoAugment policy, "v0" or "original" or a RandAugment string; "none" disables it '
                        '(default: rand-m9-mstd0.5-inc1)')
    g.add_argument('--eval_crop_pct', type=float, default=None, metavar='FRACTION',
                   help='evaluation: resize to input_size / FRACTION, then centre-crop input_size (default: 1.0 in '
                        'probe mode and when the evaluation images already have the input size, else MAE\'s '
                        '0.875 up to 224 px and 1.0 above); recorded in checkpoints')
    g.add_argument('--min_crop_scale', type=float, default=0.08,
                   help='smallest area fraction of the random-resized crop (default: 0.08, ImageNet\'s)')
    g.add_argument('--hflip', type=float, default=0.5, help='probability of a horizontal flip (default: 0.5)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase prob (default: 0.25)')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    g.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    g.add_argument('--resplit', action='store_true', default=False,
                   help='does nothing here, accepted for MAE/DeiT command lines: it acts on augmentation splits, '
                        'which this project does not use')
    g.add_argument('--mixup', type=float, default=0, help='mixup alpha, mixup enabled if > 0')
    g.add_argument('--cutmix', type=float, default=0, help='cutmix alpha, cutmix enabled if > 0')
    g.add_argument('--cutmix_minmax', type=float, nargs='+', default=None,
                   help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    g.add_argument('--mixup_prob', type=float, default=1.0,
                   help='probability of performing mixup or cutmix when either/both is enabled')
    g.add_argument('--mixup_switch_prob', type=float, default=0.5,
                   help='probability of switching to cutmix when both mixup and cutmix enabled')
    g.add_argument('--mixup_mode', type=str, default='batch',
                   help='how to apply mixup/cutmix params: per "batch", "pair", or "elem"')

    g = p.add_argument_group('weights')
    g.add_argument('--finetune', default='',
                   help='pre-trained checkpoint: the teacher\'s weights in transfer and probe modes, the starting '
                        'weights in plain mode. A file (e.g. mae_pretrain_vit_large.pth) or a name: '
                        'timm:NAME[.tag] (e.g. timm:vit_base_patch14_dinov2.lvd142m), hf-hub:ORG/NAME or an '
                        'https:// URL, downloaded once into the huggingface_hub / torch.hub cache and read from '
                        'there offline (HF_HUB_OFFLINE=1); a name also gives the architecture when --model / '
                        '--teacher_model is not set')
    g.add_argument('--student_init', default='', metavar='CKPT|NAME',
                   help='transfer and distillation modes: start the student from these pre-trained weights instead of '
                        'a random initialisation (a file or a name, as --finetune, loaded and reported the same way; '
                        'a checkpoint without a classifier for --nb_classes leaves the head freshly initialised); '
                        'not used when resuming')
    g.add_argument('--init_from_teacher', default='', metavar='COMPONENTS',
                   help='transfer and distillation modes: copy these components of the student from the teacher at '
                        'the start (the others keep their random initialisation), comma-separated: '
                        + ', '.join(COMPONENTS) + ' (docs/TRAINING.md lists their tensors); the tensors copied are '
                        'printed; not used when resuming')
    g.add_argument('--use_teacher_ema', action='store_true',
                   help='take the model_ema entry of the --finetune checkpoint instead of model')
    g.add_argument('--mean', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='input normalisation mean (default: the teacher\'s, from the pretrained config of a '
                        '--finetune name or the checkpoint of a --mode probe teacher, else ImageNet\'s '
                        '0.485 0.456 0.406); recorded in checkpoints and exports')
    g.add_argument('--std', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='input normalisation std (default: as --mean; ImageNet\'s 0.229 0.224 0.225)')

    g = p.add_argument_group('data')
    g.add_argument('--dataset_name', default='imagenet', type=str, metavar='DATASET',
                   help='a label recorded in the logs and checkpoints, nothing more: the data always come from '
                        '--data_path in the ImageFolder layout, whatever the name')
    g.add_argument('--data_path', default='', type=str, help='data set root holding train/<class>/ and val/<class>/')
    g.add_argument('--nb_classes', default=1000, type=int, help='number of classes (must match the class folders)')
    add_loader_arguments(g, jpeg_draft=True)
    add_run_arguments(p, 'training / testing', 'checkpoint to resume from, or "allow": output_dir/checkpoint.pth if it '
                      'exists, else start fresh', after_resume=add_evaluation_arguments,
                      after_save_every=add_epoch_end_arguments)
    add_tracking_arguments(p)
    add_distributed_arguments(p)
    for name, mode in MODES.items():
        annotate_mode_defaults(p, mode.defaults, name)
    # set by the caller, not by flags: the flags the command line gave (for the modes' recipes), and whether the
    # --selection file is written first by the same command (DFND_DeiT-train.py)
    p.set_defaults(explicit_flags=None, selection_pending=False, command=None)
    return p


def add_evaluation_arguments(g: argparse._ArgumentGroup) -> None:
    """The run group's evaluation flags (--eval and what it evaluates)."""
    g.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch (when not resuming)')
    g.add_argument('--eval', action='store_true',
                   help=f'evaluate only (with --resume CKPT or --finetune CKPT); the results are printed and '
                        f'written to output_dir/{EVAL_RESULTS}')
    g.add_argument('--eval_classes', default='', metavar='imagenet-a|imagenet-r|FILE',
                   help='with --eval: score an ImageNet-1k classifier on a subset of its classes, its logits '
                        'restricted to them: imagenet-a, imagenet-r (the 200 classes of ImageNet-A / -R, as timm\'s '
                        'ImageNet metadata lists them) or a FILE with one WordNet id or logit index a line, in the '
                        'order of the sorted class folders under --data_path/val (default: every class)')
    g.add_argument('--ensemble_with', default='', metavar='CKPT',
                   help='with --eval: also evaluate this model and the average of both models\' softmax outputs '
                        '(e.g. the fine-tuned teacher beside a distilled student)')
    g.add_argument('--ensemble_model', default=None,
                   help='architecture of --ensemble_with when its checkpoint does not record one (default: --model)')
    g.add_argument('--ensemble_kwargs', default=[], nargs='*', metavar='KEY=VALUE',
                   help='timm architecture arguments of --ensemble_model (default: --model_kwargs)')
    g.add_argument('--dist_eval', action='store_true', default=False,
                   help='shard evaluation over the processes (exact: every image counted once)')


def add_epoch_end_arguments(g: argparse._ArgumentGroup) -> None:
    """The run group's flags of an epoch's end: how often it evaluates, and the best epoch's checkpoint."""
    g.add_argument('--eval_every', default=1, type=int, help='evaluate every N epochs (and after the last)')
    g.add_argument('--save_best', nargs='?', const='raw', default=None, choices=['raw', 'ema'],
                   help='also keep checkpoint-best.pth, the checkpoint of the epoch with the best top-1: of the raw '
                        'weights (--save_best or --save_best raw, as DeiT) or of the EMA weights (--save_best ema, '
                        'needs --ema) (default: not kept)')


# ---------------------------------------------------------------------------------------------
# Flags -> one resolved configuration
# ---------------------------------------------------------------------------------------------
class Resolved(NamedTuple):
    """The resolved run: its read-only configuration, its mode (looked up once), its model (described once), and
    the checkpoint it resumes (read once) with its path, and the files it writes where (its run folder)."""
    cfg: Config
    mode: Mode
    ckpt: dict | None
    ckpt_path: str | None
    spec: ModelSpec | None = None
    folder: RunFolder | None = None


def evaluated_spec(ckpt: dict, mean: list | None, std: list | None) -> ModelSpec | None:
    """--eval --resume: the model its checkpoint records, with the normalisation it was trained with unless
    --mean / --std are given (None: the checkpoint records no model, e.g. MAE's; the flags describe it)."""
    spec = recorded_spec(ckpt)
    if spec is None:
        return None
    return spec.replace(mean=tuple(mean or spec.mean), std=tuple(std or spec.std))


def resolve_args(args, read_resume: bool = True) -> Resolved:
    """Resolve the flags into the run's configuration and check them before any heavy work: each step returns
    a new read-only ``Config``, nothing writes into one afterwards; the model is described once
    (util.model_record.describe_model) or, to evaluate a checkpoint, read from it.

    ``read_resume=False`` (the SLURM launcher, at submission) only checks that the checkpoint exists."""
    cfg = Config.of(args)
    check_values(cfg)
    check_wandb(cfg.log_wandb)
    check_output_folders(cfg.output_dir, cfg.log_dir)
    cfg = cfg.replace(model_kwargs=parse_kwargs(cfg.model_kwargs, '--model_kwargs'),
                      student_kwargs=parse_kwargs(cfg.student_kwargs, '--student_kwargs'))
    path = requeued_checkpoint(cfg.output_dir, cfg.resume, cfg.eval) or resume_path(cfg.resume, cfg.output_dir)
    ckpt = load_training_checkpoint(path, to_train=not cfg.eval) if path and read_resume else None
    if ckpt is not None and is_mae_checkpoint(student_weights(ckpt)):
        raise UserError(f"--resume {path}: a pre-training checkpoint of main_pretrain.py (a masked autoencoder), not "
                        f"a run of this script: give it as --finetune {path} to fine-tune it or to distil from it; "
                        "continue its pre-training with main_pretrain.py --resume")
    if ckpt is not None and not cfg.eval:
        for line in unused_start_flags({flag: getattr(cfg, flag) for flag in START_FLAGS}, recorded_args(ckpt), path):
            log(line)
    spec = evaluated_spec(ckpt, cfg.mean, cfg.std) if ckpt is not None and cfg.eval else None
    if spec is not None:
        # before the checkpoint's values replace the flags
        check_evaluated_flags(cfg.explicit_flags, {flag: getattr(cfg, flag) for flag in EVALUATED_FLAGS}, spec)
    mode = get_mode(spec.mode if spec is not None else cfg.mode)
    if not cfg.eval:
        mode.check_resumed(recorded_args(ckpt), path)
    check_resume_matches(ckpt, path, cfg.finetune, mode.uses_teacher, cfg.eval)
    cfg = cfg.replace(mode=mode.name, log_dir=cfg.output_dir if cfg.log_dir is None else cfg.log_dir,
                      **({} if cfg.eval else mode.recipe(cfg.explicit_flags)))
    described = spec if spec is not None else cfg  # the evaluated checkpoint's maps and map loss, else the flags'
    impl = attention_impl_for(cfg.attention_impl, described.map_average, described.transfer_loss)
    cfg = cfg.replace(amp=cfg.amp or default_amp(cfg.device), num_workers=usable_workers(cfg.num_workers),
                      attention_impl=resolve_attention_impl(impl, cfg.device),
                      mixup_active=cfg.mixup > 0 or cfg.cutmix > 0.0 or cfg.cutmix_minmax is not None)
    cfg = cfg.replace(teacher_dtype=teacher_dtype(cfg.teacher_dtype, cfg.amp, mode.name, mode.uses_teacher))
    if args.attention_impl == 'auto' and mode.uses_teacher:
        log(f"attention: {cfg.attention_impl} (--attention_impl auto on {cfg.device})")
    if cfg.finetune:
        local_checkpoint(cfg.finetune, '--finetune')  # a name is resolved (downloaded) here, a missing file refused
    if spec is not None:  # the evaluated checkpoint's model (its architecture is --ensemble_with's default)
        named = spec.teacher or spec.student
        cfg = cfg.replace(input_size=spec.img_size, nb_classes=spec.num_classes, eval_crop_pct=spec.eval_crop_pct,
                          model=named.name, model_kwargs=dict(named.kwargs), global_pool=spec.student.global_pool)
    elif cfg.finetune:
        cfg = cfg.replace(**finetune_defaults(cfg, mode))
    cfg = cfg.replace(model=cfg.model or DEFAULT_MODEL, eval_data_path=cfg.eval_data_path or cfg.data_path,
                      mean=list(spec.mean if spec else cfg.mean or IMAGENET_DEFAULT_MEAN),
                      std=list(spec.std if spec else cfg.std or IMAGENET_DEFAULT_STD))
    check_data_folders(cfg.eval_data_path, cfg.data_path, not cfg.eval and mode.trains_on_labels, mode.data_hint)
    if cfg.eval_crop_pct is None:
        cfg = cfg.replace(eval_crop_pct=mode.default_eval_crop_pct(cfg.input_size,
                                                                    os.path.join(cfg.eval_data_path, 'val')))
    check_run_flags(cfg, mode, holds_teacher(ckpt) or (path is not None and not read_resume), ckpt is not None)
    spec = describe_model(cfg, mode) if spec is None else spec.replace(eval_crop_pct=cfg.eval_crop_pct)
    if cfg.init_from_teacher and ckpt is None and not cfg.eval:
        check_teacher_components(spec, cfg.init_from_teacher)
    if ckpt is not None and not cfg.eval:
        check_resumed_model(ckpt, path, spec)
        for line in changed_flags(recorded_args(ckpt), cfg.record()):
            log(f"resumed with a change: {line}")
    folder = RunFolder(cfg.output_dir, cfg.log_dir, cfg.save_every, bool(cfg.save_best), cfg.eval)
    if read_resume or not path:  # at submission the resumed epoch is unknown: the job checks it
        check_inputs_not_overwritten(folder, {flag: getattr(cfg, flag) for flag in INPUT_FLAGS},
                                     next_position(ckpt)[0] if ckpt is not None else cfg.start_epoch)
    check_run_folder(cfg.output_dir, cfg.resume, path, cfg.eval)
    return Resolved(cfg, mode, ckpt, path, spec, folder)


# The flags that give the student's starting weights: a resumed run's come from its checkpoint.
START_FLAGS = ('student_init', 'init_from_teacher')


def unused_start_flags(given_flags: dict, saved: dict, path: str) -> list[str]:
    """A line for each START_FLAGS flag a resumed run gives (``given_flags``: their values), not used, with the
    value its run started with when that differs."""
    lines = []
    for flag in START_FLAGS:
        given, started = given_flags[flag], saved.get(flag) or ''
        if given:
            before = '' if given == started else f" (its run started with --{flag} {started})" if started else \
                f" (its run started without --{flag})"
            lines.append(f"--{flag} {given} is not used when resuming: the student's weights come from {path}{before}")
    return lines


def attention_impl_for(attention_impl: str, map_average: str, transfer_loss: str) -> str:
    """--attention_impl, with auto meaning explicit where the map averaging or the attention map loss of the model
    (an evaluated checkpoint's, else --map_average and --transfer_loss) needs the N x N maps."""
    if attention_impl == 'auto' and (map_average != 'none' or transfer_loss not in FUSED_TRANSFER_LOSSES):
        return 'explicit'  # the averaged maps, and the losses without a fused path, exist only as explicit maps
    return attention_impl


# ---------------------------------------------------------------------------------------------
# Model, optimizer and distributed wrapper
# ---------------------------------------------------------------------------------------------
def build_model(run: Resolved) -> TeacherStudentPair:
    """The run's model, from its description: the teacher/student pair (the student alone in plain mode), or to
    evaluate, what the saved model is evaluated as (a distilled student is a plain ViT)."""
    mode = run.mode.evaluated_as() if run.cfg.eval else run.mode
    return mode.build_model(run.spec, drop_path=run.cfg.drop_path, attention_impl=run.cfg.attention_impl)


def param_groups(model: TeacherStudentPair, mode: Mode, weight_decay: float, layer_decay: float) -> list[dict]:
    """The student's AdamW groups, as the mode forms them (layer-wise lr decay, weight decay exemptions), and those
    of the pair's training heads (the feature projector: ``weight_decay`` on its weights, none on its biases, the
    full lr)."""
    heads = [g for head in model.training_heads.values() for g in param_groups_weight_decay(head, weight_decay)]
    return mode.param_groups(model.student, weight_decay, layer_decay) + heads


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    cfg = Config.of(args)
    cfg = cfg.replace(**init_distributed_mode(cfg))
    with Console():  # rank 0's console, kept in the run folder once the run begins
        run = resolve_args(cfg)
        epochs = run.mode.known_epochs(run.cfg.epochs, run.cfg.explicit_flags)
        if not run.cfg.eval and finished(run.ckpt, run.ckpt_path, epochs, run.cfg.output_dir):
            destroy()
            return {}
        first_epoch = run.cfg.start_epoch if run.cfg.eval else start_epoch(run.ckpt, run.cfg.start_epoch)
        with output_dir_in_use(run.folder, first_epoch), \
                stop_on_signals(enabled=not run.cfg.eval, keeps_checkpoint=bool(run.cfg.output_dir)):
            return train_and_evaluate(run)


def evaluate_only(cfg: Config, model, ckpt: dict | None, ckpt_path: str | None, evaluator: Evaluator) -> dict:
    """--eval: the checkpoint's raw and EMA weights, or with --ensemble_with both models and their average."""
    model_ema = None
    if ckpt is not None:
        model_ema = ModelEmaV3(model.student) if holds_ema(ckpt) else None
        restore_weights(ckpt, ckpt_path, model, model_ema)
    model = restrict_classes(model, cfg.eval_classes, cfg.nb_classes)
    if cfg.ensemble_with:
        other = load_ensemble_member(cfg).to(evaluator.device)
        models = {'model': model, 'other': restrict_classes(other, cfg.eval_classes, cfg.nb_classes)}
        results = evaluate_ensemble(evaluator.loader, models, evaluator.device, evaluator.amp_dtype, cfg.dist_eval,
                                    cfg.print_freq)
        stats = {f'{prefix}{k}': v for name, prefix in (('model', 'test_'), ('other', 'other_test_'),
                                                         ('ensemble', 'ensemble_test_'))
                 for k, v in results[name].items()}
    else:
        stats = evaluator(model, model_ema)
    write_eval_results(cfg, stats, ckpt_path, (ckpt.get('epoch'), ckpt.get('step')) if ckpt is not None else None)
    return stats


def train_and_evaluate(run: Resolved) -> dict:
    cfg, mode, ckpt = run.cfg, run.mode, run.ckpt
    device = torch.device(cfg.device)
    rank, world = get_rank(), get_world_size()
    torch.backends.cudnn.benchmark = True
    seed_epoch(cfg.seed, 0, rank)

    data = DataSettings.from_config(cfg)
    dataset_val = build_eval_dataset(data)
    dataset_train = None if cfg.eval else mode.train_dataset(data)
    if cfg.cache_images:
        dataset_val, dataset_train = (cache_decoded(d) if d is not None else None for d in (dataset_val, dataset_train))
    if getattr(dataset_train, 'classes', dataset_val.classes) != dataset_val.classes:
        raise DataError(f"train and val class folders differ under {cfg.data_path!r}; give both splits the same "
                        "class folders")
    sampler_val = ShardSampler(dataset_val, world, rank) if cfg.dist_eval else range(len(dataset_val))
    model = build_model(run)
    load_initial_weights(model, mode, cfg, ckpt, run.spec.pair_map)
    if cfg.train_qkv:
        restrict_to_qkv(model.student)
    model.to(device)
    held = hold_teacher(model.teacher, cfg.teacher_dtype)
    if held:
        log(held)
    amp_dtype = AMP_DTYPES[cfg.amp]
    model_ema = ModelEmaV3(model.student, decay=cfg.ema) if cfg.ema is not None and not cfg.eval else None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.compile:  # after the EMA's deep copy, which must not share the compiled blocks
        model.compile_blocks()
    log(startup_summary(run, model, dataset_train, dataset_val))
    loader_val = build_loader(dataset_val, sampler_val, cfg.batch_size, cfg.num_workers,
                              pins_memory(cfg.pin_mem, cfg.device), train=False)
    evaluator = Evaluator(loader_val, device, amp_dtype, cfg.dist_eval, cfg.print_freq)
    if cfg.eval:
        stats = evaluate_only(cfg, model, ckpt, run.ckpt_path, evaluator)
        destroy()
        return stats
    lr = learning_rate(cfg, get_world_size())
    epochs = mode.epochs(dataset_train, cfg.epochs, cfg.explicit_flags, cfg.presentations)
    schedule = Schedule(lr, cfg.min_lr, cfg.warmup_epochs, epochs, cfg.sched, tuple(cfg.step_epochs), cfg.step_rate)
    stats = {}
    if not finished(ckpt, run.ckpt_path, schedule.epochs, cfg.output_dir):  # epochs the training set gave
        stats = Trainer(run, model, model_ema, dataset_train, evaluator, schedule, device, amp_dtype).fit()
    destroy()
    return stats


def startup_summary(run: Resolved, model: TeacherStudentPair, dataset_train, dataset_val) -> str:
    """What the run is, in a few lines (the full configuration is the run folder's config.yaml)."""
    cfg, spec = run.cfg, run.spec
    teacher = f"teacher {spec.teacher.label()} from {cfg.finetune or 'random weights'}; " if spec.teacher else ''
    start = f"--finetune {cfg.finetune}" if cfg.finetune and not spec.teacher else 'random weights'
    lines = [f"mode {run.mode.name}: {teacher}student {spec.student.label()} ({type(model.student).__name__}, "
             f"{trainable_parameters(model) / 1e6:.2f}M trainable parameters, from "
             f"{'the checkpoint' if run.ckpt is not None else start})"
             + (f"; transferred layers {model.describe_layers()}" if model.layer_pairs else '')]
    if 'feature_projector' in model.training_heads:
        lines.append(f"{model.describe_feature_term()}, weight --feature_weight {cfg.feature_weight:g}")
    images = (f"{len(dataset_train)} training, " if dataset_train is not None else '') + \
        f"{len(dataset_val)} validation images"
    lines.append(f"data: {images}, {spec.num_classes} classes, {spec.img_size} px; output: "
                 f"{cfg.output_dir or 'none (nothing is kept)'}")
    return '\n'.join(lines)


def trainable_parameters(model: TeacherStudentPair) -> int:
    return sum(p.numel() for p in model.student.parameters() if p.requires_grad)


class Trainer(EpochEnd):
    """The training run: its optimizer, criterion and training step, the components its checkpoints hold, and
    each epoch's end (evaluation, best accuracies, log.txt); the loop over epochs is util.run_loop's (``fit``)."""

    unfinished_part = 'its evaluation and log.txt line were not written'

    def __init__(self, run: Resolved, model: TeacherStudentPair, model_ema, dataset_train, evaluator: Evaluator,
                 schedule: Schedule, device: torch.device, amp_dtype) -> None:
        cfg, mode = run.cfg, run.mode
        self.schedule, self.model, self.model_ema, self.evaluator = schedule, model, model_ema, evaluator
        self.eval_every, self.output_dir = cfg.eval_every, cfg.output_dir
        groups = param_groups(model, mode, cfg.weight_decay, cfg.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, cfg.beta2), fused=device.type == 'cuda')
        criterion = mode.criterion(cfg, model, evaluator.loader, device, amp_dtype).to(device)
        aux_params = [p for p in criterion.parameters() if p.requires_grad]
        aux_optimizer = torch.optim.Adam(aux_params, lr=cfg.noise_lr) if aux_params else None
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
        data = dataset_fingerprint(dataset_train)
        # what checkpoints record as their args: the configuration and the values resolved while building
        # the student's start: a resumed run's --student_init and --init_from_teacher are not used
        started = {flag: recorded_args(run.ckpt).get(flag) or '' if run.ckpt else getattr(cfg, flag)
                   for flag in START_FLAGS}
        record = {**cfg.record(), 'lr': schedule.lr, 'epochs': schedule.epochs, 'train_data': data, **started,
                  'model_spec': run.spec.to_record(), **mode.resolved_values(criterion)}
        checkpointer = Checkpointer(cfg.output_dir, checkpoint_components(model, model_ema, optimizer, scaler,
                                                                         criterion, aux_optimizer),
                                    record, device, schedule.epochs, cfg.save_every)
        self.best_accuracy = BestAccuracy(best_record(run.ckpt))
        self.best_key = {'raw': 'test_acc1', 'ema': 'ema_test_acc1'}.get(cfg.save_best)
        ddp_model = wrap_ddp(model, cfg.distributed, cfg.gpu, cfg.device)
        step = TrainingStep(ddp_model, criterion, optimizer, scaler, device, cfg.accum_iter,
                            cfg.clip_grad, amp_dtype, mixup(cfg), model_ema, model.student, aux_optimizer)
        self.loop = RunLoop(RunParts('training', cfg, step, dataset_train, data, schedule, checkpointer, run.ckpt,
                                     run.ckpt_path, flag_names(get_args_parser())), self)

    def fit(self) -> dict:
        return self.loop.fit()

    def due(self, epoch: int) -> bool:
        """Whether ``epoch``'s end evaluates: every --eval_every epochs and after the last."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.schedule.epochs

    def best(self) -> dict:
        return self.best_accuracy.best

    def finish(self, stats: dict) -> None:
        log(self.best_accuracy.summary(stats))

    def end(self, epoch: int, train_stats: dict, evaluate_now: bool, loop: RunLoop) -> dict:
        """After the epoch's checkpoint: its evaluation (a better top-1 rewrites the epoch's checkpoints, and
        checkpoint-best.pth with --save_best) and its log.txt line."""
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                 'n_parameters': trainable_parameters(self.model)}
        if evaluate_now:
            test_stats = self.evaluator(self.model, self.model_ema)
            stats.update(test_stats)
            improved = self.best_accuracy.update(test_stats, epoch)
            stats.update(self.best_accuracy.log_fields())
            if improved:  # this epoch's checkpoints are written again so that a resume continues the same record
                loop.save(epoch, None, epoch_stats=train_stats, with_best=self.best_key in improved)
            if self.best_key in improved:
                log(f"{BEST}: epoch {epoch}, {self.best_key} {test_stats[self.best_key]:.2f}%")
            log(self.best_accuracy.summary(test_stats))
            loop.log_scalars('perf', {k: v for k, v in test_stats.items() if k.endswith(('acc1', 'acc5', 'loss'))},
                             epoch)
        write_log(self.output_dir, stats)
        loop.flush()
        return stats


def checkpoint_components(model: TeacherStudentPair, model_ema, optimizer: torch.optim.Optimizer,
                          scaler: torch.amp.GradScaler, criterion: torch.nn.Module,
                          aux_optimizer: torch.optim.Optimizer | None) -> dict:
    """What a training checkpoint holds: the student (``model``), the teacher only where the student cannot
    run without it (copy modes), the EMA student, the optimizer and grad scaler, and the criterion's own
    parameters with their optimizer when it has any (probe: noise adaptation)."""
    components = {'model': Weights(model.student)}
    components.update({name: Weights(head) for name, head in model.training_heads.items()})
    if model.needs_teacher_at_eval:  # a checkpoint without it (another mode's) takes it from --finetune
        components['teacher'] = Weights(model.teacher, if_missing=None, frozen=True)
    if model_ema is not None:
        components['model_ema'] = Weights(model_ema.module, if_missing="--ema is set: resume without --ema, or from "
                                                                       "a run that kept one")
    components.update(optimizer=optimizer, scaler=scaler)
    if aux_optimizer is not None:
        components.update(criterion=Weights(criterion), aux_optimizer=aux_optimizer)
    return components


def mixup(cfg: Config) -> Mixup | None:
    """timm's Mixup / CutMix of the training batches, when --mixup, --cutmix or --cutmix_minmax is set."""
    return None if not cfg.mixup_active else Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax, prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
        num_classes=cfg.nb_classes)


def command_parser() -> Parser:
    return Parser('python main_finetune.py', parents=[get_args_parser()], description=__doc__,
                  formatter_class=HelpFormatter)


def run(argv=None) -> dict:
    return run_command(command_parser(), 'main_finetune.py', main, argv)


if __name__ == '__main__':
    run_cli(reporting_stop, run)  # a requested stop (SIGINT / SIGTERM) reported in one line
