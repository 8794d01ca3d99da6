"""Train a ViT student with attention transfer from a frozen teacher, or train / fine-tune a plain ViT.

    # attention distillation (the seed's recipe, 64 GPUs; here via torchrun on one node)
    torchrun --nproc_per_node 8 main_finetune.py --model dual_vit_large_patch16 --mode distill \\
        --end_layer -6 --atd_weight 3.0 --finetune mae_pretrain_vit_large.pth --data_path $IMAGENET ...
    # evaluate a checkpoint (model, mode and sizes come from the checkpoint)
    python main_finetune.py --eval --resume output_dir/checkpoint.pth --data_path $IMAGENET

Flow: arguments -> data -> model (teacher weights) -> optimizer, EMA -> resume -> epochs of
train_one_epoch / checkpoint / evaluate -> log.txt and TensorBoard.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from engine_finetune import evaluate, evaluate_ensemble, train_one_epoch
from models_dual_vit import MODE_CHOICES, DualViT, build_dual_vit, create_vit, get_transfer_mode, resolve_model_name
from models_probe import ProbeDistiller, build_probe_distiller
from util.args import HelpFormatter, annotate_mode_defaults, explicit_flags, parse_kwargs
from util.checkpoint import (
    load_training_checkpoint,
    next_position,
    resume_path,
    rng_state,
    save_atomic,
    seed_epoch,
    set_rng_state,
)
from util.datasets import (
    LAYOUT,
    DataError,
    ImageFiles,
    ResumableDistributedSampler,
    ShardSampler,
    build_dataset,
    build_loader,
    wild_transform,
)
from util.distributed import (
    barrier,
    ddp_ignore,
    destroy,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    log,
)
from util.errors import UserError
from util.losses import ProbeCriterion, TransferCriterion, build_task_criterion
from util.lr_decay import param_groups_lrd
from util.pretrained import (
    checkpoint_architecture,
    is_named,
    load_exact,
    load_pretrained_weights,
    local_checkpoint,
    pool_of_state_dict,
    read_checkpoint,
    select_state_dict,
)
from util.run_control import RunControl

# The arguments that define the model: --eval --resume takes them from the checkpoint.
MODEL_ARGS = ('model', 'mode', 'teacher_model', 'student_model', 'model_kwargs', 'student_kwargs', 'input_size',
              'nb_classes', 'global_pool', 'transfer_layers', 'end_layer', 'share_drop_path', 'probe_blocks')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
PROBE = 'probe'
DEFAULT_MODEL = 'vit_large_patch16'
EVAL_RESULTS = 'eval_results.json'
# The Attention Probe reference's recipe (AdamW, lr 7.5e-4, weight decay 0.025, batch 256, no label
# tricks); --mode probe applies it to every one of these flags the command line does not set.
PROBE_DEFAULTS = dict(lr=7.5e-4, weight_decay=0.025, batch_size=256, layer_decay=1.0, warmup_epochs=0,
                      min_lr=0.0, smoothing=0.0, drop_path=0.0, aa='none', reprob=0.0, mixup=0.0, cutmix=0.0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('Attention transfer / ViT fine-tuning', add_help=False)
    p.add_argument('--batch_size', default=64, type=int,
                   help='batch size per GPU (effective batch size is batch_size * accum_iter * # gpus)')
    p.add_argument('--epochs', default=50, type=int, help='number of training epochs')
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
    g.add_argument('--mode', default='none', type=str, choices=list(MODE_CHOICES) + [PROBE],
                   help='attention transfer mode; none trains a plain ViT; probe: Attention Probe distillation, '
                        'which sets every one of ' + ', '.join(f'--{k}' for k in PROBE_DEFAULTS) + ' that the '
                        'command line leaves unset to the reference\'s recipe (shown as "--mode probe: VALUE") '
                        '(default: %(default)s)')
    g.add_argument('--end_layer', default=0, type=int,
                   help='transfer layers [0, depth + end_layer); 0 = all layers, -6 = all but the last 6')
    g.add_argument('--transfer_layers', default=None, type=str,
                   help='explicit transferred layers, e.g. 0-17 or 0,2,4 (overrides --end_layer)')
    g.add_argument('--atd_weight', default=3, type=float,
                   help='weight of the attention distillation loss (distill modes)')
    g.add_argument('--no_share_drop_path', action='store_false', dest='share_drop_path',
                   help='draw the student\'s stochastic-depth masks alone instead of sharing them with the teacher')
    g.add_argument('--train_qkv', action='store_true', help='train only the student\'s qkv, head and fc_norm')

    g = p.add_argument_group('attention probe (--mode probe: distil on selected wild images, no labels)')
    g.add_argument('--selection', default='', help='selection file written by select_wild_data.py')
    g.add_argument('--eval_data_path', default='',
                   help='the target task\'s folder with val/<class>/ to evaluate on (default: --data_path)')
    g.add_argument('--kd_temperature', default=4.0, type=float, help='temperature T of the KD loss (times T^2)')
    g.add_argument('--robust', action='store_true',
                   help='weight each image\'s KD term by the class-balance weight of the teacher\'s prediction '
                        '(the selection\'s weights plus uniform noise in [0, 0.1))')
    g.add_argument('--no_noise_adaptation', action='store_false', dest='noise_adaptation',
                   help='drop the noise adaptation layer (DFND) and its NLL loss')
    g.add_argument('--noise_lr', default=1e-3, type=float, help='Adam lr of the noise adaptation parameters')
    g.add_argument('--teacher_acc', default=None, type=float,
                   help='teacher accuracy (0-1) on the target task, the diagonal of the noise transition matrix '
                        '(default: measured on the evaluation set before training)')
    g.add_argument('--patchattn', default=0.8, type=float, help='weight of the patch attention probe loss')
    g.add_argument('--probe_blocks', default=None, type=str,
                   help='teacher blocks whose features the patch probe compares, e.g. 3,7,11 (default: 1/3, 2/3 '
                        'and the last block); student blocks are matched by relative depth')
    g.add_argument('--probe_norm', default='tokens', choices=['tokens', 'channels'],
                   help='L2-normalise features along the token axis (the reference) or the channel axis')

    g = p.add_argument_group('optimizer')
    g.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
    g.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (absolute lr; default: --blr x effective batch size / 256)')
    g.add_argument('--blr', type=float, default=1e-3, metavar='LR',
                   help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    g.add_argument('--beta2', type=float, default=0.999, metavar='BETA2', help='beta_2 of AdamW')
    g.add_argument('--layer_decay', type=float, default=0.75, help='layer-wise lr decay from ELECTRA/BEiT')
    g.add_argument('--min_lr', type=float, default=1e-6, metavar='LR',
                   help='lower lr bound for cyclic schedulers that hit 0')
    g.add_argument('--warmup_epochs', type=int, default=5, metavar='N', help='epochs to warm up the lr')
    g.add_argument('--ema', default=None, type=float, metavar='ALPHA',
                   help='EMA decay of the student (default: None, no EMA); evaluated beside the raw weights')
    g.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='mixed precision: bf16 (default on CUDA, no loss scaling), fp16 (with a grad scaler), '
                        'none (default on CPU)')

    g = p.add_argument_group('augmentation')
    g.add_argument('--color_jitter', type=float, default=None, metavar='PCT',
                   help='color jitter factor (enabled only when not using Auto/RandAug)')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                   help='AutoAugment policy, "v0" or "original" or a RandAugment string; "none" disables it '
                        '(default: rand-m9-mstd0.5-inc1)')
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
    g.add_argument('--num_workers', default=10, type=int, help='data loading processes per GPU')
    g.add_argument('--pin_mem', action='store_true',
                   help='pin CPU memory in the DataLoader for more efficient transfer to GPU (default)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin CPU memory')
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='./output_dir', help='where to save checkpoints and log.txt; empty: none')
    g.add_argument('--log_dir', default=None, help='where to write TensorBoard events (default: --output_dir)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='device to use for training / testing (default: cuda when available)')
    g.add_argument('--seed', default=0, type=int, help='random seed')
    g.add_argument('--resume', default='',
                   help='checkpoint to resume from, or "allow": output_dir/checkpoint.pth if it exists, '
                        'else start fresh')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch (when not resuming)')
    g.add_argument('--eval', action='store_true',
                   help=f'evaluate only (with --resume CKPT or --finetune CKPT); the results are printed and '
                        f'written to output_dir/{EVAL_RESULTS}')
    g.add_argument('--ensemble_with', default='', metavar='CKPT',
                   help='with --eval: also evaluate this model and the average of both models\' softmax outputs '
                        '(e.g. the fine-tuned teacher beside a distilled student)')
    g.add_argument('--ensemble_model', default=None,
                   help='architecture of --ensemble_with when its checkpoint does not record one (default: --model)')
    g.add_argument('--ensemble_kwargs', default=[], nargs='*', metavar='KEY=VALUE',
                   help='timm architecture arguments of --ensemble_model (default: --model_kwargs)')
    g.add_argument('--dist_eval', action='store_true', default=False,
                   help='shard evaluation over the processes (exact: every image counted once)')
    g.add_argument('--save_every', default=20, type=int,
                   help='also keep checkpoint-<epoch>.pth every N epochs and at the end (0: only checkpoint.pth)')
    g.add_argument('--eval_every', default=1, type=int, help='evaluate every N epochs (and after the last)')
    g.add_argument('--save_best', nargs='?', const='raw', default=None, choices=['raw', 'ema'],
                   help='also keep checkpoint-best.pth, the checkpoint of the epoch with the best top-1: of the raw '
                        'weights (--save_best or --save_best raw, as DeiT) or of the EMA weights (--save_best ema, '
                        'needs --ema) (default: not kept)')
    g.add_argument('--print_freq', default=20, type=int,
                   help='print and log the loss every N steps; mid-epoch checkpoints and preemption stops '
                        'happen at these steps too')
    g.add_argument('--checkpoint_minutes', default=10, type=float,
                   help='also write checkpoint.pth inside an epoch every N minutes (0: only at epoch ends), so a '
                        'preempted or crashed job loses at most that much training')

    g = p.add_argument_group('distributed')
    g.add_argument('--world_size', default=1, type=int, help='number of distributed processes (set by torchrun)')
    g.add_argument('--local_rank', default=-1, type=int, help='ignored; torchrun passes LOCAL_RANK')
    g.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    g.add_argument('--dist_timeout', default=30, type=int,
                   help='minutes a collective may wait before the job fails (a hung rank ends the job)')
    annotate_mode_defaults(p, PROBE_DEFAULTS, PROBE)
    return p


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------
def apply_probe_defaults(args) -> None:
    """In probe mode, the Attention Probe reference's recipe for every flag the command line left unset."""
    explicit = getattr(args, 'explicit_flags', None)
    if explicit is None:  # called from code: its values are taken as given
        return
    for key, value in PROBE_DEFAULTS.items():
        if key not in explicit:
            setattr(args, key, value)


def resolve_args(args, read_resume: bool = True) -> tuple[dict | None, str | None]:
    """Fill derived defaults and check the flags before any heavy work; returns (checkpoint to resume, its path).

    ``read_resume=False`` (the SLURM launcher, at submission) only checks that the checkpoint exists."""
    args.model_kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    args.student_kwargs = parse_kwargs(args.student_kwargs, '--student_kwargs')
    path = resume_path(args.resume, args.output_dir)
    ckpt = load_training_checkpoint(path) if path and read_resume else None
    if ckpt is not None and args.eval and isinstance(ckpt.get('args'), dict):
        for key in MODEL_ARGS:
            if key in ckpt['args']:
                setattr(args, key, ckpt['args'][key])
    if args.mode == 'none':
        args.mode = None
    if ckpt is not None and args.eval and isinstance(ckpt.get('args'), dict):
        for key in ('mean', 'std'):  # the normalisation the checkpoint was trained with, unless overridden
            if getattr(args, key, None) is None and ckpt['args'].get(key) is not None:
                setattr(args, key, ckpt['args'][key])
    if getattr(args, 'log_dir', None) is None:
        args.log_dir = args.output_dir
    probe = args.mode == PROBE
    if probe and not args.eval:
        apply_probe_defaults(args)
    if args.amp is None:
        args.amp = 'bf16' if str(args.device).startswith('cuda') else 'none'
    args.mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if args.finetune:
        finetune_file = local_checkpoint(args.finetune, '--finetune')  # a name is resolved (downloaded) here
        follow_finetune_source(args, probe)
    if not args.model:
        args.model = DEFAULT_MODEL
    args.mean = list(args.mean or IMAGENET_DEFAULT_MEAN)
    args.std = list(args.std or IMAGENET_DEFAULT_STD)
    resolve_model_name(args.model)
    for name in ('teacher_model', 'student_model'):
        if getattr(args, name):
            resolve_model_name(getattr(args, name))

    args.eval_data_path = args.eval_data_path or args.data_path
    if not args.eval_data_path:
        raise ValueError("give --data_path: a folder holding train/<class>/ and val/<class>/"
                         + (" (in probe mode, --eval_data_path: the target task's folder with val/<class>/)"
                            if probe else ''))
    splits = [(args.eval_data_path, 'val')]
    if not args.eval and not probe:
        splits.append((args.data_path, 'train'))
    for root, split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{split} data not found: {os.path.join(root, split)!r} is not a directory. "
                            f"Expected the layout {LAYOUT}.")

    transfer = None if probe else get_transfer_mode(args.mode)
    if args.finetune and not args.eval and args.output_dir and os.path.realpath(finetune_file) == os.path.realpath(
            os.path.join(args.output_dir, 'checkpoint.pth')):
        raise ValueError(f"--output_dir {args.output_dir!r} would overwrite the --finetune checkpoint with this run's "
                         "checkpoint.pth; give the run its own output folder")
    has_teacher_weights = (ckpt is not None and 'teacher' in ckpt) or (path is not None and not read_resume)
    needs_teacher = (probe and not args.eval) or (
        transfer is not None and (not args.eval or transfer.needs_teacher_at_eval))
    if needs_teacher and not args.finetune and not has_teacher_weights:
        raise ValueError(f"mode {args.mode} needs the teacher's weights: --finetune PATH "
                         + ("(the teacher trained on the target task)" if probe else
                            "(e.g. mae_pretrain_vit_large.pth)"))
    if probe and not args.eval:
        if not args.selection or not os.path.isfile(args.selection):
            raise FileNotFoundError(f"mode probe trains on a selection of wild images: --selection FILE written by "
                                    f"select_wild_data.py (got {args.selection!r})")
        if args.mixup_active:
            raise ValueError("mode probe has no labels to mix: drop --mixup / --cutmix")
    if args.save_best == 'ema' and args.ema is None and not args.eval:
        raise UserError("--save_best ema keeps the checkpoint of the best EMA top-1, but there is no EMA: add --ema "
                        "DECAY (e.g. --ema 0.9999), or use --save_best (raw weights)")
    if args.ensemble_with and not args.eval:
        raise ValueError("--ensemble_with is an evaluation: add --eval (and --resume CKPT for the first model)")
    if args.eval and ckpt is None and not args.finetune:
        raise ValueError("--eval needs a checkpoint: --resume CKPT (or --finetune CKPT for pre-trained weights)")
    if args.mixup_active and args.batch_size % 2:
        raise ValueError("mixup/cutmix pair up the images of a batch: --batch_size must be even "
                         f"(got {args.batch_size})")
    if args.accum_iter < 1 or args.print_freq < 1 or args.eval_every < 1:
        raise ValueError("--accum_iter, --print_freq and --eval_every must be >= 1")
    return ckpt, path


def follow_finetune_source(args, probe: bool) -> None:
    """What the --finetune checkpoint says about its model: a name (timm:, hf-hub:) gives the architecture
    when --model / --teacher_model are not set, and its pretrained config's mean and std; this project's
    checkpoint of a probe teacher gives the normalisation it was trained with. --mean / --std override;
    ImageNet's are the fallback. (Other local files are not read here: MAE's and timm's record no
    normalisation, and a large teacher would be read twice.)"""
    arch = checkpoint_architecture(args.finetune) if is_named(args.finetune) or probe else None
    if arch is None:
        return
    if is_named(args.finetune) and not args.model and not args.teacher_model:
        args.model = arch['model']
        args.model_kwargs = {**arch['model_kwargs'], **args.model_kwargs}
        log(f"architecture from --finetune {args.finetune}: {args.model} {args.model_kwargs}")
        pool_given = 'global_pool' in (getattr(args, 'explicit_flags', None) or ())
        if args.eval and args.mode is None and not pool_given:  # evaluating the named classifier as it is
            args.global_pool = arch['global_pool'] or pool_of_state_dict(select_state_dict(
                read_checkpoint(args.finetune)))
    if arch.get('mean') is not None and arch.get('std') is not None and (args.mean is None or args.std is None):
        args.mean = args.mean or list(arch['mean'])
        args.std = args.std or list(arch['std'])
        log(f"input normalisation: mean {args.mean}, std {args.std} (the --finetune teacher's; --mean / --std "
            "override)")


def build_model(args, eval_only: bool = False) -> DualViT | ProbeDistiller:
    """The teacher/student pair (the student alone in plain mode, or to evaluate a distilled student).

    The student's resolved timm name and arguments are written back to ``args.student_model`` /
    ``args.student_kwargs``, so that every checkpoint describes its student completely."""
    probe = args.mode == PROBE
    transfer = None if probe else get_transfer_mode(args.mode)
    mode = args.mode
    if eval_only and (probe or (transfer is not None and not transfer.needs_teacher_at_eval)):
        mode = None  # a distilled student is a plain ViT at evaluation
    teacher, teacher_kwargs, teacher_pool = args.teacher_model or args.model, args.model_kwargs, args.global_pool
    if mode == PROBE and args.finetune:  # the target-task teacher's own architecture, as its checkpoint records it
        arch = checkpoint_architecture(args.finetune)
        if arch is not None and not args.teacher_model:
            teacher, teacher_kwargs, teacher_pool = arch['model'], arch['model_kwargs'], arch['global_pool']
    student = args.student_model or teacher
    student_kwargs = args.student_kwargs if args.student_model else {**teacher_kwargs, **args.student_kwargs}
    args.student_model, args.student_kwargs = resolve_model_name(student), student_kwargs
    if mode == PROBE:
        return build_probe_distiller(teacher, student, args.nb_classes, args.input_size, args.global_pool,
                                     args.drop_path, args.probe_blocks, teacher_kwargs, student_kwargs,
                                     teacher_global_pool=teacher_pool)
    return build_dual_vit(teacher if mode else None, student, mode=mode, drop_path_rate=args.drop_path,
                          end_layer=args.end_layer, transfer_layers=args.transfer_layers,
                          num_classes=args.nb_classes, global_pool=args.global_pool, img_size=args.input_size,
                          share_drop_path=args.share_drop_path, teacher_kwargs=teacher_kwargs,
                          student_kwargs=student_kwargs)


def load_initial_weights(model: DualViT, args, ckpt: dict | None) -> None:
    """--finetune: the teacher's weights in transfer modes (unless the checkpoint holds them), the
    student's starting point in plain mode (unless a checkpoint is resumed)."""
    if not args.finetune:
        return
    if model.teacher is not None:
        if ckpt is None or 'teacher' not in ckpt:
            log(f"teacher: {model.load_teacher(args.finetune, use_ema=args.use_teacher_ema)}")
    elif ckpt is None:
        report = load_pretrained_weights(model.student, args.finetune, use_ema=args.use_teacher_ema)
        log(f"student: {report}")
        if 'head.weight' not in report.loaded and hasattr(model.student.head, 'weight'):
            trunc_normal_(model.student.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation


def restrict_to_qkv(student: torch.nn.Module) -> None:
    """--train_qkv: freeze everything but the qkv projections, the head and fc_norm."""
    for name, param in student.named_parameters():
        param.requires_grad = 'qkv' in name or name.startswith(('head.', 'fc_norm.'))


def wrap_ddp(model: DualViT, args) -> torch.nn.Module:
    """DDP over the student's gradients; the frozen teacher is neither broadcast nor reduced."""
    if not args.distributed:
        return model
    if model.teacher is not None:
        ignored = [f'teacher.{n}' for n, _ in model.teacher.named_parameters()]
        ignored += [f'teacher.{n}' for n, _ in model.teacher.named_buffers()]
        ddp_ignore(model, ignored)
    device_ids = [args.gpu] if str(args.device).startswith('cuda') else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=model.may_leave_student_parameters_unused)


def build_train_dataset(args):
    """The labelled training split, or in probe mode the selected wild images (unlabelled)."""
    if args.mode != PROBE:
        return build_dataset(True, args)
    selection = read_checkpoint(args.selection)
    if selection.get('nb_classes') not in (None, args.nb_classes):
        raise ValueError(f"{args.selection} was selected for a {selection['nb_classes']}-class teacher, "
                         f"but --nb_classes is {args.nb_classes}")
    paths = [selection['paths'][i] for i in selection['selected'].tolist()]
    log(f"probe training set: {len(paths)} wild images selected ({selection.get('ranking')}) from {selection['root']}")
    return ImageFiles(selection['root'], paths, wild_transform(args.input_size, train=True, hflip=args.hflip,
                                                               mean=args.mean, std=args.std))


def build_criterion(args, model, loader_val, device, amp_dtype) -> torch.nn.Module:
    """TransferCriterion (task loss + atd_weight * transfer loss), or in probe mode the ProbeCriterion."""
    if args.mode != PROBE:
        return TransferCriterion(build_task_criterion(args.mixup_active, args.smoothing), args.atd_weight)
    if args.noise_adaptation and args.teacher_acc is None:
        stats = evaluate(loader_val, model.teacher, device, amp_dtype, args.dist_eval, name='teacher')
        args.teacher_acc = stats['acc1'] / 100.0
        log(f"teacher accuracy on the evaluation set: {args.teacher_acc:.4f} (the noise transition's diagonal; "
            "set --teacher_acc to use a known value instead)")
    weights = None
    if args.robust:
        clean = read_checkpoint(args.selection)['class_weights'].float()
        generator = torch.Generator().manual_seed(args.seed)
        weights = clean + torch.rand(clean.shape, generator=generator) * 0.1
    return ProbeCriterion(args.nb_classes, args.kd_temperature, args.patchattn, args.noise_adaptation,
                          args.teacher_acc if args.teacher_acc is not None else 1.0, weights,
                          model.student.num_prefix_tokens, args.probe_norm)


def checkpoint_state(model, model_ema, optimizer, scaler, criterion, aux_optimizer, args, epoch: int,
                     step: int | None, best: BestAccuracy) -> dict:
    state = {'model': model.student.state_dict(), 'optimizer': optimizer.state_dict(),
             'scaler': scaler.state_dict(), 'epoch': epoch, 'step': step, 'args': vars(args), 'rng': rng_state(),
             'best': best.best}
    if model.needs_teacher_at_eval:
        state['teacher'] = model.teacher.state_dict()
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    if aux_optimizer is not None:  # the criterion's own parameters (probe: noise adaptation)
        state['criterion'] = criterion.state_dict()
        state['aux_optimizer'] = aux_optimizer.state_dict()
    return state


def restore_weights(ckpt: dict, path: str, model: DualViT, model_ema) -> None:
    """The student, the teacher (copy modes) and the EMA student from a checkpoint."""
    load_exact(model.student, ckpt['model'], f"checkpoint {path!r} (model)")
    if 'teacher' in ckpt and model.teacher is not None:
        load_exact(model.teacher, ckpt['teacher'], f"checkpoint {path!r} (teacher)")
    if model_ema is not None:
        if 'model_ema' not in ckpt:
            raise ValueError(f"--ema is set but {path!r} holds no model_ema: resume without --ema, or from a run "
                             "that kept one")
        load_exact(model_ema.module, ckpt['model_ema'], f"checkpoint {path!r} (model_ema)")


def load_ensemble_member(args) -> torch.nn.Module:
    """The model of --ensemble_with: a checkpoint of this project (any mode), a classifier checkpoint
    of --ensemble_model / --model's architecture (e.g. an MAE fine-tuned ViT), or a named classifier
    (timm:NAME.tag, hf-hub:ORG/NAME: its own architecture; an https:// URL)."""
    path = args.ensemble_with
    ckpt = read_checkpoint(local_checkpoint(path, '--ensemble_with'))
    if isinstance(ckpt, dict) and isinstance(ckpt.get('args'), dict) and 'model' in ckpt['args']:
        member_args = argparse.Namespace(**{**vars(args), **{k: ckpt['args'][k] for k in MODEL_ARGS
                                                           if k in ckpt['args']}})
        member_args.finetune = ''
        member = build_model(member_args, eval_only=True)
        restore_weights(ckpt, path, member, None)
        return member
    name = args.ensemble_model or args.teacher_model or args.model
    kwargs = parse_kwargs(args.ensemble_kwargs, '--ensemble_kwargs') if args.ensemble_model else args.model_kwargs
    named = checkpoint_architecture(path) if is_named(path) and not args.ensemble_model else None
    pool = args.global_pool
    if named is not None:  # a timm: / hf-hub: name gives its architecture; timm pools by average iff it has fc_norm
        name, kwargs = named['model'], named['model_kwargs']
        pool = named['global_pool'] or pool_of_state_dict(select_state_dict(ckpt))
    member = create_vit(name, num_classes=args.nb_classes, global_pool=pool, img_size=args.input_size, **kwargs)
    report = load_pretrained_weights(member, path, checkpoint=ckpt)
    if 'head.weight' not in report.loaded:
        raise ValueError(f"--ensemble_with {path}: no classifier head for {args.nb_classes} classes was loaded")
    log(f"ensemble member: {report}")
    return member


def write_eval_results(args, stats: dict, ckpt_path: str | None) -> None:
    """--eval: the results, and what was evaluated, in output_dir/eval_results.json (beside the printed lines)."""
    log(f"evaluation: {json.dumps(stats)}")
    if not args.output_dir or not is_main_process():
        return
    os.makedirs(args.output_dir, exist_ok=True)
    record = {'checkpoint': ckpt_path or args.finetune, 'ensemble_with': args.ensemble_with or None,
              'data_path': args.eval_data_path, 'mean': args.mean, 'std': args.std, **stats}
    path = os.path.join(args.output_dir, EVAL_RESULTS)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)
    os.replace(path + '.tmp', path)
    log(f"evaluation results written to {path}")


class BestAccuracy:
    """Best top-1 so far of the raw and EMA weights, with their epochs; kept in checkpoints so that a resumed
    run continues the same record (--save_best keeps checkpoint-best.pth by the raw or EMA top-1)."""

    KEYS = ('test_acc1', 'ema_test_acc1')

    def __init__(self, state: dict | None = None):
        self.best = dict(state or {})  # key -> {'acc1': value, 'epoch': epoch}

    def update(self, stats: dict, epoch: int) -> list[str]:
        """Record this epoch's accuracies; returns the keys whose best it improved."""
        improved = []
        for key in self.KEYS:
            if key in stats and (key not in self.best or stats[key] > self.best[key]['acc1']):
                self.best[key] = {'acc1': stats[key], 'epoch': epoch}
                improved.append(key)
        return improved

    def log_fields(self) -> dict:
        """best_test_acc1, best_test_acc1_epoch (and the EMA's) for log.txt."""
        out = {}
        for key, record in self.best.items():
            out[f'best_{key}'] = record['acc1']
            out[f'best_{key}_epoch'] = record['epoch']
        return out

    def summary(self, final: dict) -> str:
        parts = []
        for key, name in (('test_acc1', 'raw'), ('ema_test_acc1', 'EMA')):
            if key in self.best:
                parts.append(f"{name}: final {final.get(key, float('nan')):.2f}%, best {self.best[key]['acc1']:.2f}% "
                             f"(epoch {self.best[key]['epoch']})")
        return 'top-1 accuracy ' + '; '.join(parts) if parts else 'no evaluation ran'


def write_log(args, stats: dict) -> None:
    if args.output_dir and is_main_process():
        with open(os.path.join(args.output_dir, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(stats) + '\n')


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    ckpt, ckpt_path = resolve_args(args)
    init_distributed_mode(args)
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    log(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    log(json.dumps(vars(args), indent=1, default=str))
    torch.backends.cudnn.benchmark = True
    seed_epoch(args.seed, 0, rank)

    dataset_val = build_dataset(False, args, root=os.path.join(args.eval_data_path, 'val'))
    dataset_train = None if args.eval else build_train_dataset(args)
    if getattr(dataset_train, 'classes', dataset_val.classes) != dataset_val.classes:
        raise ValueError(f"train and val class folders differ under {args.data_path!r}")
    sampler_val = ShardSampler(dataset_val, world, rank) if args.dist_eval else range(len(dataset_val))
    loader_val = build_loader(dataset_val, sampler_val, args, train=False)

    model = build_model(args, eval_only=args.eval)
    load_initial_weights(model, args, ckpt)
    if args.train_qkv:
        restrict_to_qkv(model.student)
    model.to(device)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    model_ema = ModelEmaV3(model.student, decay=args.ema) if args.ema is not None else None
    n_parameters = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    log(f"student: {type(model.student).__name__} {model.student.default_cfg.get('architecture')}, "
        f"{n_parameters / 1e6:.2f}M trainable parameters; mode {args.mode or 'none'}"
        + (f", transferred layers {model.layers}" if model.layers else ''))

    def eval_all(epoch_model: DualViT, ema=None) -> dict:
        stats = {f'test_{k}': v for k, v in
                 evaluate(loader_val, epoch_model, device, amp_dtype, args.dist_eval, name='model').items()}
        if ema is not None:
            ema_stats = evaluate(loader_val, epoch_model.with_student(ema.module), device, amp_dtype,
                                 args.dist_eval, name='EMA')
            stats.update({f'ema_test_{k}': v for k, v in ema_stats.items()})
        return stats

    if args.eval:
        if ckpt is not None:
            model_ema = ModelEmaV3(model.student) if 'model_ema' in ckpt else None
            restore_weights(ckpt, ckpt_path, model, model_ema)
        if args.ensemble_with:
            models = {'model': model, 'other': load_ensemble_member(args).to(device)}
            results = evaluate_ensemble(loader_val, models, device, amp_dtype, args.dist_eval)
            stats = {f'{prefix}{k}': v for name, prefix in (('model', 'test_'), ('other', 'other_test_'),
                                                             ('ensemble', 'ensemble_test_'))
                     for k, v in results[name].items()}
        else:
            stats = eval_all(model, model_ema)
        write_eval_results(args, stats, ckpt_path)
        destroy()
        return stats

    # ---- training ----
    eff_batch_size = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    log(f"base lr: {args.lr * 256 / eff_batch_size:.2e}  actual lr: {args.lr:.2e}  "
        f"accumulate grad iterations: {args.accum_iter}  effective batch size: {eff_batch_size}")
    sampler_train = ResumableDistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    loader_train = build_loader(dataset_train, sampler_train, args, train=True)
    steps_per_epoch = sampler_train.num_samples // args.batch_size  # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset_train)} training images on {world} processes make no full batch of "
                         f"{args.batch_size}; lower --batch_size")

    groups = param_groups_lrd(model.student, args.weight_decay, model.student.no_weight_decay(), args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2))
    mixup_fn = None
    if args.mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    criterion = build_criterion(args, model, loader_val, device, amp_dtype).to(device)
    aux_params = [p for p in criterion.parameters() if p.requires_grad]
    aux_optimizer = torch.optim.Adam(aux_params, lr=args.noise_lr) if aux_params else None

    start_epoch, start_step, resume_rng = args.start_epoch, 0, None
    best = BestAccuracy(ckpt.get('best') if ckpt is not None else None)
    if ckpt is not None:
        restore_weights(ckpt, ckpt_path, model, model_ema)
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        if aux_optimizer is not None:
            criterion.load_state_dict(ckpt['criterion'])
            aux_optimizer.load_state_dict(ckpt['aux_optimizer'])
        start_epoch, start_step = next_position(ckpt)
        resume_rng = ckpt.get('rng') if start_step else None
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step}")
    ddp_model = wrap_ddp(model, args)

    log_writer = None
    if is_main_process():
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            log_writer = SummaryWriter(log_dir=args.log_dir, purge_step=int(start_epoch * 1000) or None)

    def save(epoch: int, step: int | None, extra_name: str | None = None) -> None:
        if not args.output_dir:
            return
        if is_main_process():
            state = checkpoint_state(model, model_ema, optimizer, scaler, criterion, aux_optimizer, args, epoch, step,
                                     best)
            save_atomic(state, os.path.join(args.output_dir, 'checkpoint.pth'))
            if extra_name:
                save_atomic(state, os.path.join(args.output_dir, extra_name))
        barrier()

    control = RunControl(args.checkpoint_minutes, save)
    log(f"start training for {args.epochs} epochs ({steps_per_epoch} steps each) from epoch {start_epoch}"
        + (f", step {start_step}" if start_step else ''))
    start_time, stats = time.time(), {}
    best_key = {'raw': 'test_acc1', 'ema': 'ema_test_acc1'}.get(args.save_best)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank, loader_train.generator)
        first_step = start_step if epoch == start_epoch else 0
        if first_step and resume_rng is not None:
            set_rng_state(resume_rng)
        sampler_train.set_epoch(epoch, start_index=first_step * args.batch_size)
        train_stats = train_one_epoch(
            ddp_model, criterion, loader_train, optimizer, device, epoch, scaler, args, amp_dtype=amp_dtype,
            mixup_fn=mixup_fn, model_ema=model_ema, ema_source=model.student, log_writer=log_writer,
            aux_optimizer=aux_optimizer,
            start_step=first_step, steps_per_epoch=steps_per_epoch, control=control)
        last = epoch + 1 == args.epochs
        keep = args.save_every and ((epoch + 1) % args.save_every == 0 or last)
        save(epoch, None, f'checkpoint-{epoch}.pth' if keep else None)

        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, 'n_parameters': n_parameters}
        if (epoch + 1) % args.eval_every == 0 or last:
            test_stats = eval_all(model, model_ema)
            stats.update(test_stats)
            improved = best.update(test_stats, epoch)
            stats.update(best.log_fields())
            if best_key in improved:  # checkpoint.pth is written again so that it records the new best too
                save(epoch, None, 'checkpoint-best.pth')
                log(f"checkpoint-best.pth: epoch {epoch}, {best_key} {test_stats[best_key]:.2f}%")
            log(best.summary(test_stats))
            if log_writer is not None:
                for k, v in test_stats.items():
                    if k.endswith(('acc1', 'acc5', 'loss')):
                        log_writer.add_scalar(f"perf/{k}", v, epoch)
        write_log(args, stats)
        if log_writer is not None:
            log_writer.flush()

    log(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    log(best.summary(stats))
    if log_writer is not None:
        log_writer.close()
    destroy()
    return stats


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser('python main_finetune.py', parents=[get_args_parser()],
                                     description=__doc__, formatter_class=HelpFormatter)
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return main(args)


if __name__ == '__main__':
    try:
        run()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        traceback.print_exc()
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        # a failed rank must take the job down, not leave the others waiting in a collective
        os._exit(1)
