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
import math
import os
import sys
import time

import torch
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from engine_finetune import NonFiniteLossError, evaluate, evaluate_ensemble, train_one_epoch
from models_dual_vit import MODE_CHOICES, DualViT, build_dual_vit, create_vit, get_transfer_mode, resolve_model_name
from models_probe import ProbeDistiller, build_probe_distiller
from select_wild_data import training_class_weights
from util.args import HelpFormatter, annotate_mode_defaults, explicit_flags, parse_kwargs
from util.checkpoint import (
    check_finite,
    load_training_checkpoint,
    next_position,
    resume_path,
    resume_rng,
    resume_step,
    rng_state,
    samples_done,
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
    default_eval_crop_pct,
    labelled_originals,
    normalization,
    wild_transform,
)
from util.distributed import (
    all_gather_object,
    barrier,
    ddp_ignore,
    destroy,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    log,
)
from util.errors import UserError, run_cli
from util.losses import ProbeCriterion, TransferCriterion, build_task_criterion
from util.lr_decay import param_groups_lrd
from util.output import check_inputs_not_overwritten, checkpoint_bytes, output_dir_in_use, warn_if_little_space
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
from util.run_control import Preempted, RunControl, stop_on_signals

# The arguments that define the model: --eval --resume takes them from the checkpoint.
MODEL_ARGS = ('model', 'mode', 'teacher_model', 'student_model', 'model_kwargs', 'student_kwargs', 'input_size',
              'nb_classes', 'global_pool', 'transfer_layers', 'end_layer', 'share_drop_path', 'probe_blocks',
              'eval_crop_pct')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
PROBE = 'probe'
DEFAULT_MODEL = 'vit_large_patch16'
EVAL_RESULTS = 'eval_results.json'
# The Attention Probe reference's recipe (AdamW, lr 7.5e-4, weight decay 0.025, batch 256, no label
# tricks); --mode probe applies it to every one of these flags the command line does not set.
# Its models classify from the class token (the attention probe reads that token) and its lr steps down
# x0.1 at epochs 200 and 300; without --epochs, the epochs come from --presentations (see probe_epochs).
PROBE_DEFAULTS = dict(lr=7.5e-4, weight_decay=0.025, batch_size=256, layer_decay=1.0, warmup_epochs=0,
                      min_lr=0.0, smoothing=0.0, drop_path=0.0, aa='none', reprob=0.0, mixup=0.0, cutmix=0.0,
                      global_pool=False, sched='step')
# The reference's training budget: 320,000 iterations of 512 images (251 epochs for 650,000 selected images).
PROBE_PRESENTATIONS = 320000 * 512
# What probe training reads from a selection file of select_wild_data.py.
SELECTION_ENTRIES = ('root', 'paths', 'selected')


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
    g.add_argument('--attention_impl', default='fused', choices=['fused', 'explicit'],
                   help='fused (default): every mode through scaled_dot_product_attention, the teacher handing over '
                        'q/k/v and the distillation loss computed in query-row chunks, so no N x N map is stored; '
                        'explicit: N x N attention maps in float32 (diagnostics, benchmarks; same numbers)')

    g = p.add_argument_group('speed and memory')
    g.add_argument('--grad_checkpointing', action='store_true',
                   help='recompute each student block in the backward pass instead of storing its activations '
                        '(less memory, about one more forward of time); same losses and gradients')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the teacher and student blocks (the first steps compile); same losses and '
                        'gradients up to float rounding')

    g = p.add_argument_group('attention probe (--mode probe: distil on selected wild images, no labels)')
    g.add_argument('--selection', default='', help='selection file written by select_wild_data.py')
    g.add_argument('--eval_data_path', default='',
                   help='the target task\'s folder with val/<class>/ to evaluate on (default: --data_path)')
    g.add_argument('--kd_temperature', default=4.0, type=float, help='temperature T of the KD loss (times T^2)')
    g.add_argument('--robust', action='store_true',
                   help='weight each image\'s KD term by the class-balance weight of the teacher\'s prediction '
                        '(the selection\'s weights plus uniform noise in [0, 0.1))')
    g.add_argument('--pos_num', default=0, type=int,
                   help='mix this many labelled originals per class from the target task\'s training split '
                        '(--eval_data_path/train) into the selected images, as the reference\'s ImageNet script')
    g.add_argument('--class_weights', default='augmented', choices=['augmented', 'selection'],
                   help='--robust: class-balance weights from a pass over the selection with the training '
                        'augmentation, as the reference (cached beside the selection), or from the unaugmented '
                        'scoring pass stored in the selection file')
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
    g.add_argument('--presentations', default=PROBE_PRESENTATIONS, type=int,
                   help='probe mode without --epochs: train int(presentations / training images) - 1 epochs, as the '
                        'reference (default 320000 x 512: 251 epochs for 650,000 selected images)')
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
    g.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='mixed precision: bf16 (default on CUDA, no loss scaling), fp16 (with a grad scaler), '
                        'none (default on CPU)')

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
    g.add_argument('--num_workers', default=10, type=int,
                   help='data loading processes per GPU; they persist across epochs and are re-seeded per epoch')
    g.add_argument('--no_jpeg_draft', action='store_false', dest='jpeg_draft',
                   help='decode JPEGs at full resolution; by default the crop is chosen from the header\'s size and '
                        'the decoder reduces the scale (1/2 to 1/8) as far as the crop still covers the output size '
                        '(same crops and random draws; pixels within about one grey level)')
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
def probe_epochs(num_images: int, presentations: int = PROBE_PRESENTATIONS) -> int:
    """The reference's epochs for a training set of ``num_images``: ``int(presentations / num_images) - 1``."""
    return max(int(presentations / num_images) - 1, 1)


def _check_range(flag: str, value: float, low: float, high: float, low_open: bool = False,
                 high_open: bool = False, meaning: str = '') -> None:
    """Raise a UserError naming ``flag`` unless ``value`` lies in the interval (open ends as given)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"--{flag} {value:g}: must lie in {interval}" + (f" ({meaning})" if meaning else ''))


def check_values(args) -> None:
    """Numeric flags that no run can use, rejected before anything is loaded."""
    if not args.eval and args.epochs <= 0:
        raise UserError(f"--epochs {args.epochs}: must be >= 1 (the total number of epochs to train; to only "
                        "evaluate a checkpoint use --eval --resume CKPT)")
    if not math.isfinite(args.atd_weight) or args.atd_weight < 0:
        raise UserError(f"--atd_weight {args.atd_weight:g}: the weight of the attention distillation loss must be "
                        "finite and >= 0 (the seed's distill recipe uses 3)")
    _check_range('drop_path', args.drop_path, 0, 1, high_open=True, meaning='a stochastic-depth rate; 1 drops every '
                 'block')
    _check_range('smoothing', args.smoothing, 0, 1, high_open=True, meaning='label smoothing; 1 leaves no label')
    _check_range('min_crop_scale', args.min_crop_scale, 0, 1, low_open=True,
                 meaning='the smallest area fraction of the random-resized crop')
    _check_range('hflip', args.hflip, 0, 1, meaning='a probability')


def check_output_folders(args) -> None:
    """--output_dir / --log_dir must be folders, or paths where one can be created."""
    for flag in ('output_dir', 'log_dir'):
        folder = getattr(args, flag)
        existing = os.path.abspath(folder) if folder else ''
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing and not os.path.isdir(existing):
            what = 'is a file' if existing == os.path.abspath(folder) else f'lies under the file {existing!r}'
            raise UserError(f"--{flag} {folder!r} {what}, not a folder: give a folder path (it is created if "
                            "missing)")


def resolve_args(args, read_resume: bool = True) -> tuple[dict | None, str | None]:
    """Fill derived defaults and check the flags before any heavy work; returns (checkpoint to resume, its path).

    ``read_resume=False`` (the SLURM launcher, at submission) only checks that the checkpoint exists."""
    check_values(args)
    check_output_folders(args)
    args.model_kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    args.student_kwargs = parse_kwargs(args.student_kwargs, '--student_kwargs')
    path = resume_path(args.resume, args.output_dir)
    ckpt = load_training_checkpoint(path, to_train=not args.eval) if path and read_resume else None
    if ckpt is not None and 'converted_from' in ckpt and not args.eval:
        raise UserError(f"--resume {path!r} is a checkpoint of the attention transfer reference's dual model: its "
                        "optimizer state does not map onto this project's student, so training cannot continue from "
                        "it. Evaluate it with --eval --resume, ensemble it with --ensemble_with, export its student "
                        "with tools/export_student.py, or start a new run from its student with --finetune.")
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
    if not args.eval:
        apply_mode_defaults(args)
    if args.amp is None:
        args.amp = 'bf16' if str(args.device).startswith('cuda') else 'none'
    args.mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if args.finetune:
        local_checkpoint(args.finetune, '--finetune')  # a name is resolved (downloaded) here, a missing file refused
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
        raise UserError("give --data_path: a folder holding train/<class>/ and val/<class>/"
                        + (" (in probe mode, --eval_data_path: the target task's folder with val/<class>/)"
                           if probe else ''))
    splits = [(args.eval_data_path, 'val')]
    if not args.eval and not probe:
        splits.append((args.data_path, 'train'))
    for root, split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{split} data not found: {os.path.join(root, split)!r} is not a directory. "
                            f"Expected the layout {LAYOUT}.")
    if args.eval_crop_pct is None:
        args.eval_crop_pct = default_eval_crop_pct(args.input_size, os.path.join(args.eval_data_path, 'val'), probe)
    if not 0.0 < args.eval_crop_pct <= 1.0:
        raise UserError(f"--eval_crop_pct {args.eval_crop_pct}: the crop fraction must be in (0, 1] (1.0: evaluate "
                        "the image at the input size, uncropped; 0.875: MAE's ImageNet evaluation)")

    transfer = None if probe else get_transfer_mode(args.mode)
    if read_resume or not path:  # at submission the resumed epoch is unknown: the job checks it
        check_inputs_not_overwritten(args, next_position(ckpt)[0] if ckpt is not None else args.start_epoch)
    has_teacher_weights = (ckpt is not None and 'teacher' in ckpt) or (path is not None and not read_resume)
    needs_teacher = (probe and not args.eval) or (
        transfer is not None and (not args.eval or transfer.needs_teacher_at_eval))
    if needs_teacher and not args.finetune and not has_teacher_weights:
        raise UserError(f"mode {args.mode} needs the teacher's weights: --finetune PATH "
                        + ("(the teacher trained on the target task)" if probe else
                           "(e.g. mae_pretrain_vit_large.pth)"))
    if probe and (args.grad_checkpointing or args.compile):
        raise UserError("--grad_checkpointing and --compile apply to the attention transfer modes and plain training, "
                        "not to --mode probe: drop them")
    if probe and not args.eval:
        if not args.selection or not os.path.isfile(args.selection):
            raise UserError(f"mode probe trains on a selection of wild images: --selection FILE written by "
                            f"select_wild_data.py (got {args.selection!r})")
        if args.mixup_active:
            raise UserError("mode probe has no labels to mix: drop --mixup / --cutmix")
    if args.save_best == 'ema' and args.ema is None and not args.eval:
        raise UserError("--save_best ema keeps the checkpoint of the best EMA top-1, but there is no EMA: add --ema "
                        "DECAY (e.g. --ema 0.9999), or use --save_best (raw weights)")
    if args.ensemble_with and not args.eval:
        raise UserError("--ensemble_with is an evaluation: add --eval (and --resume CKPT for the first model)")
    if args.eval and ckpt is None and not args.finetune:
        raise UserError("--eval needs a checkpoint: --resume CKPT (or --finetune CKPT for pre-trained weights)")
    if args.mixup_active and args.batch_size % 2:
        raise UserError("mixup/cutmix pair up the images of a batch: --batch_size must be even "
                        f"(got {args.batch_size})")
    if args.accum_iter < 1 or args.print_freq < 1 or args.eval_every < 1:
        raise UserError("--accum_iter, --print_freq and --eval_every must be >= 1")
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


# ---------------------------------------------------------------------------------------------
# Modes: what each one builds (defaults, model, training set, criterion, lr decay, epochs)
# ---------------------------------------------------------------------------------------------
class LabelledMode:
    """Plain training and the attention transfer modes: the labelled training split, the dual model
    (the student alone in plain mode), the task loss plus ``atd_weight`` x the transfer loss."""

    defaults: dict = {}

    def teacher_architecture(self, args) -> tuple[str, dict, bool | str]:
        return args.teacher_model or args.model, args.model_kwargs, args.global_pool

    def build_model(self, args, mode, teacher: str, student: str, teacher_kwargs: dict, student_kwargs: dict,
                    teacher_pool) -> DualViT:
        return build_dual_vit(teacher if mode else None, student, mode=mode, drop_path_rate=args.drop_path,
                              end_layer=args.end_layer, transfer_layers=args.transfer_layers,
                              num_classes=args.nb_classes, global_pool=args.global_pool, img_size=args.input_size,
                              share_drop_path=args.share_drop_path, attention_impl=args.attention_impl,
                              teacher_kwargs=teacher_kwargs, student_kwargs=student_kwargs)

    def train_dataset(self, args):
        return build_dataset(True, args)

    def criterion(self, args, model, loader_val, device, amp_dtype) -> torch.nn.Module:
        return TransferCriterion(build_task_criterion(args.mixup_active, args.smoothing), args.atd_weight)

    def lr_decay_layers(self, args, depth: int) -> int:
        """Transfer modes count the layers as the attention transfer reference groups its dual model
        (``depth``: the last block shares the head's scale); plain training keeps MAE's ``depth + 1``."""
        return depth if get_transfer_mode(args.mode) is not None else depth + 1

    def epochs(self, args, num_images: int) -> int:
        return args.epochs


class ProbeMode:
    """Attention Probe distillation: the selected wild images (unlabelled), the target-task teacher
    beside a student, KD + noise adaptation + the patch attention probe loss; the reference's recipe
    for every flag the command line leaves unset."""

    defaults = PROBE_DEFAULTS

    def teacher_architecture(self, args) -> tuple[str, dict, bool | str]:
        """The target-task teacher's own architecture, as its checkpoint records it."""
        teacher, teacher_kwargs, teacher_pool = args.teacher_model or args.model, args.model_kwargs, args.global_pool
        if args.finetune:
            arch = checkpoint_architecture(args.finetune)
            if arch is not None and not args.teacher_model:
                teacher, teacher_kwargs, teacher_pool = arch['model'], arch['model_kwargs'], arch['global_pool']
        return teacher, teacher_kwargs, teacher_pool

    def build_model(self, args, mode, teacher: str, student: str, teacher_kwargs: dict, student_kwargs: dict,
                    teacher_pool) -> ProbeDistiller:
        return build_probe_distiller(teacher, student, args.nb_classes, args.input_size, args.global_pool,
                                     args.drop_path, args.probe_blocks, teacher_kwargs, student_kwargs,
                                     teacher_global_pool=teacher_pool)

    def train_dataset(self, args) -> ImageFiles:
        selection = read_selection(args.selection)
        if selection.get('nb_classes') not in (None, args.nb_classes):
            raise UserError(f"{args.selection} was selected for a {selection['nb_classes']}-class teacher, "
                            f"but --nb_classes is {args.nb_classes}")
        paths = [selection['paths'][i] for i in selection['selected'].tolist()]
        log(f"probe training set: {len(paths)} wild images selected ({selection.get('ranking')}) "
            f"from {selection['root']}")
        if args.pos_num:  # absolute paths: ImageFiles joins them to the wild root unchanged
            originals = labelled_originals(os.path.join(args.eval_data_path, 'train'), args.pos_num, args.seed)
            log(f"  + {len(originals)} labelled originals ({args.pos_num} per class) from "
                f"{os.path.join(args.eval_data_path, 'train')}, used like the wild images (no labels)")
            paths += originals
        mean, std = normalization(args)
        return ImageFiles(selection['root'], paths, wild_transform(args.input_size, train=True, hflip=args.hflip,
                                                                   mean=mean, std=std))

    def criterion(self, args, model, loader_val, device, amp_dtype) -> torch.nn.Module:
        if args.noise_adaptation and args.teacher_acc is None:
            stats = evaluate(loader_val, model.teacher, device, amp_dtype, args.dist_eval, name='teacher',
                             print_freq=args.print_freq)
            args.teacher_acc = stats['acc1'] / 100.0
            log(f"teacher accuracy on the evaluation set: {args.teacher_acc:.4f} (the noise transition's diagonal; "
                "set --teacher_acc to use a known value instead)")
        weights = None
        if args.robust:
            if args.class_weights == 'augmented':
                if is_main_process():
                    clean = training_class_weights(model.teacher, args.selection, local_checkpoint(args.finetune),
                                                   args.input_size, args.hflip, args.seed, args.batch_size,
                                                   args.device, amp_dtype, args.mean, args.std)
                barrier()
                if not is_main_process():  # rank 0 wrote the cache
                    clean = training_class_weights(model.teacher, args.selection, local_checkpoint(args.finetune),
                                                   args.input_size, args.hflip, args.seed, args.batch_size,
                                                   args.device, amp_dtype, args.mean, args.std)
                log("class-balance weights from an augmented pass over the selection: "
                    + ' '.join(f"{w:.3f}" for w in clean.tolist()[:20]) + (' ...' if len(clean) > 20 else ''))
            else:
                clean = read_selection(args.selection, ('class_weights',))['class_weights'].float()
            generator = torch.Generator().manual_seed(args.seed)
            weights = clean + torch.rand(clean.shape, generator=generator) * 0.1
        return ProbeCriterion(args.nb_classes, args.kd_temperature, args.patchattn, args.noise_adaptation,
                              args.teacher_acc if args.teacher_acc is not None else 1.0, weights,
                              model.student.num_prefix_tokens, args.probe_norm)

    def lr_decay_layers(self, args, depth: int) -> int:
        return depth + 1  # MAE's count (the probe recipe's layer_decay is 1 anyway)

    def epochs(self, args, num_images: int) -> int:
        """--epochs when given, else the reference's budget in image presentations."""
        if 'epochs' in (getattr(args, 'explicit_flags', None) or ['epochs']):
            return args.epochs
        epochs = probe_epochs(num_images, args.presentations)
        log(f"probe mode: {epochs} epochs = int({args.presentations} presentations / {num_images} "
            "training images) - 1, as the reference (give --epochs to choose)")
        return epochs


MODES = {PROBE: ProbeMode()}


def mode_of(mode: str | None) -> LabelledMode | ProbeMode:
    """What --mode builds: probe mode's recipe, or the labelled one (plain and attention transfer)."""
    return MODES.get(mode, LabelledMode())


def apply_mode_defaults(args) -> None:
    """The mode's own recipe for every flag the command line left unset (probe: the reference's)."""
    explicit = getattr(args, 'explicit_flags', None)
    if explicit is None:  # called from code: its values are taken as given
        return
    for key, value in mode_of(args.mode).defaults.items():
        if key not in explicit:
            setattr(args, key, value)


def build_model(args, eval_only: bool = False) -> DualViT | ProbeDistiller:
    """The teacher/student pair (the student alone in plain mode, or to evaluate a distilled student).

    The student's resolved timm name and arguments are written back to ``args.student_model`` /
    ``args.student_kwargs``, so that every checkpoint describes its student completely."""
    probe = args.mode == PROBE
    transfer = None if probe else get_transfer_mode(args.mode)
    mode = args.mode
    if eval_only and (probe or (transfer is not None and not transfer.needs_teacher_at_eval)):
        mode = None  # a distilled student is a plain ViT at evaluation
    recipe = mode_of(mode)
    teacher, teacher_kwargs, teacher_pool = recipe.teacher_architecture(args)
    student = args.student_model or teacher
    student_kwargs = args.student_kwargs if args.student_model else {**teacher_kwargs, **args.student_kwargs}
    args.student_model, args.student_kwargs = resolve_model_name(student), student_kwargs
    return recipe.build_model(args, mode, teacher, student, teacher_kwargs, student_kwargs, teacher_pool)


def param_groups(model: DualViT | ProbeDistiller, args) -> list[dict]:
    """The student's AdamW groups with layer-wise lr decay over the mode's count of layers."""
    num_layers = mode_of(args.mode).lr_decay_layers(args, len(model.student.blocks))
    return param_groups_lrd(model.student, args.weight_decay, model.student.no_weight_decay(), args.layer_decay,
                            num_layers=num_layers)


def load_initial_weights(model: DualViT, args, ckpt: dict | None) -> None:
    """--finetune: the teacher's weights in transfer modes (unless the checkpoint holds them), the
    student's starting point in plain mode (unless a checkpoint is resumed)."""
    if not args.finetune:
        return
    if model.teacher is not None:
        if ckpt is None or 'teacher' not in ckpt:
            log(f"teacher: {model.load_teacher(args.finetune, use_ema=args.use_teacher_ema, flag='--finetune')}")
    elif ckpt is None:
        report = load_pretrained_weights(model.student, args.finetune, use_ema=args.use_teacher_ema, flag='--finetune')
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


def read_selection(path: str, entries: tuple[str, ...] = SELECTION_ENTRIES) -> dict:
    """A selection file of select_wild_data.py, checked for the ``entries`` the caller reads."""
    selection = read_checkpoint(path, flag='--selection')
    missing = [k for k in entries if not isinstance(selection, dict) or k not in selection]
    if missing:
        raise UserError(f"--selection {path!r} is not a selection file (no {', '.join(missing)} entries); write one "
                        "with select_wild_data.py --teacher TEACHER --wild_path IMAGES --output FILE")
    return selection



def checkpoint_state(model, model_ema, optimizer, scaler, criterion, aux_optimizer, args, epoch: int,
                     step: int | None, best: BestAccuracy, partial: dict | None = None) -> dict:
    """The whole training state (with the best accuracies so far); mid-epoch also the position in samples
    and the epoch's loss sums."""
    world = get_world_size()
    rngs = all_gather_object(rng_state())  # every rank's: a resume on as many ranks restores each its own
    state = {'model': model.student.state_dict(), 'optimizer': optimizer.state_dict(),
             'scaler': scaler.state_dict(), 'epoch': epoch, 'step': step, 'args': vars(args), 'rng': rngs[0],
             'rng_per_rank': rngs, 'world_size': world, 'best': best.best}
    if step is not None:
        state['samples'] = step * args.batch_size * world
        state['partial_epoch'] = partial
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
            raise UserError(f"--ema is set but {path!r} holds no model_ema: resume without --ema, or from a run "
                            "that kept one")
        load_exact(model_ema.module, ckpt['model_ema'], f"checkpoint {path!r} (model_ema)")


def load_ensemble_member(args) -> torch.nn.Module:
    """The model of --ensemble_with: a checkpoint of this project (any mode), a classifier checkpoint
    of --ensemble_model / --model's architecture (e.g. an MAE fine-tuned ViT), or a named classifier
    (timm:NAME.tag, hf-hub:ORG/NAME: its own architecture; an https:// URL)."""
    path = args.ensemble_with
    ckpt = read_checkpoint(local_checkpoint(path, '--ensemble_with'), flag='--ensemble_with')
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
    report = load_pretrained_weights(member, path, checkpoint=ckpt, flag='--ensemble_with')
    if 'head.weight' not in report.loaded:
        raise UserError(f"--ensemble_with {path}: no classifier head for {args.nb_classes} classes was loaded")
    log(f"ensemble member: {report}")
    return member


def describe_checkpoint(path: str, epoch: int, step: int | None) -> str:
    return f"{path} ({f'end of epoch {epoch}' if step is None else f'epoch {epoch}, step {step}'})"


def last_good_sentence(last_good: str | None) -> str:
    if last_good is None:
        return "this run has written no checkpoint yet and resumed none."
    return f"the last good checkpoint is {last_good}."


def lr_floor_warning(lr: float, min_lr: float, eff_batch_size: int, accum_iter: int) -> str:
    """The warning for a schedule whose floor (--min_lr) is above its peak: the half-cycle cosine then
    rises from the peak towards the floor for the whole run instead of decaying. A recipe's --blr and
    --min_lr are tuned together for its effective batch (the seed's copy recipe: 64 GPUs x 32)."""
    factor = math.floor(min_lr / lr) + 1  # the smallest larger batch whose peak exceeds the floor
    return (f"WARNING: --min_lr {min_lr:.2e} is above the peak lr {lr:.2e} (blr x effective batch "
            f"{eff_batch_size} / 256), so the learning rate rises towards --min_lr for the whole run instead of "
            f"decaying. The recipe was tuned for a larger effective batch: raise it, e.g. --accum_iter "
            f"{accum_iter * factor} (peak {lr * factor:.2e}), or set --lr / --min_lr for this batch size.")


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
    """One JSON line; NaN and infinity (not JSON) are written as null."""
    if args.output_dir and is_main_process():
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
        with open(os.path.join(args.output_dir, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(finite, allow_nan=False) + '\n')


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    ckpt, ckpt_path = resolve_args(args)
    if ckpt is not None and not args.eval and next_position(ckpt)[0] >= args.epochs:
        # a finished run resumed again (e.g. --resume allow in a requeued job) is not an error
        log(f"nothing to do: {ckpt_path} has finished epoch {next_position(ckpt)[0] - 1}, the last of --epochs "
            f"{args.epochs}; to train longer raise --epochs, to evaluate add --eval")
        return {}
    init_distributed_mode(args)
    with output_dir_in_use(args), stop_on_signals(enabled=not args.eval):
        return train_and_evaluate(args, ckpt, ckpt_path)


def train_and_evaluate(args, ckpt: dict | None, ckpt_path: str | None) -> dict:
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    log(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    log(json.dumps(vars(args), indent=1, default=str))
    torch.backends.cudnn.benchmark = True
    seed_epoch(args.seed, 0, rank)

    dataset_val = build_dataset(False, args, root=os.path.join(args.eval_data_path, 'val'))
    recipe = mode_of(args.mode)
    dataset_train = None if args.eval else recipe.train_dataset(args)
    if getattr(dataset_train, 'classes', dataset_val.classes) != dataset_val.classes:
        raise DataError(f"train and val class folders differ under {args.data_path!r}; give both splits the same "
                        "class folders")
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
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile:  # after the EMA's deep copy, which must not share the compiled blocks
        model.compile_blocks()
    n_parameters = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    log(f"student: {type(model.student).__name__} {model.student.default_cfg.get('architecture')}, "
        f"{n_parameters / 1e6:.2f}M trainable parameters; mode {args.mode or 'none'}"
        + (f", transferred layers {model.layers}" if model.layers else ''))

    def eval_all(epoch_model: DualViT, ema=None) -> dict:
        stats = {f'test_{k}': v for k, v in
                 evaluate(loader_val, epoch_model, device, amp_dtype, args.dist_eval, name='model',
                          print_freq=args.print_freq).items()}
        if ema is not None:
            ema_stats = evaluate(loader_val, epoch_model.with_student(ema.module), device, amp_dtype,
                                 args.dist_eval, name='EMA', print_freq=args.print_freq)
            stats.update({f'ema_test_{k}': v for k, v in ema_stats.items()})
        return stats

    if args.eval:
        if ckpt is not None:
            model_ema = ModelEmaV3(model.student) if 'model_ema' in ckpt else None
            restore_weights(ckpt, ckpt_path, model, model_ema)
        if args.ensemble_with:
            models = {'model': model, 'other': load_ensemble_member(args).to(device)}
            results = evaluate_ensemble(loader_val, models, device, amp_dtype, args.dist_eval, args.print_freq)
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
    if args.min_lr > args.lr and is_main_process():
        print(lr_floor_warning(args.lr, args.min_lr, eff_batch_size, args.accum_iter), file=sys.stderr, flush=True)
    args.epochs = recipe.epochs(args, len(dataset_train))
    sampler_train = ResumableDistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    loader_train = build_loader(dataset_train, sampler_train, args, train=True)
    steps_per_epoch = sampler_train.num_samples // args.batch_size  # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset_train)} training images on {world} processes make no full batch of "
                        f"{args.batch_size}; lower --batch_size")

    groups = param_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == 'cuda')
    mixup_fn = None
    if args.mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    criterion = recipe.criterion(args, model, loader_val, device, amp_dtype).to(device)
    aux_params = [p for p in criterion.parameters() if p.requires_grad]
    aux_optimizer = torch.optim.Adam(aux_params, lr=args.noise_lr) if aux_params else None

    if is_main_process() and args.output_dir:
        saved = [model.student, criterion] + ([model_ema.module] if model_ema is not None else []) \
            + ([model.teacher] if model.needs_teacher_at_eval else [])
        warn_if_little_space(args.output_dir, checkpoint_bytes(saved, optimizer), bool(args.save_every))

    start_epoch, start_step, start_rng, partial, last_good = args.start_epoch, 0, None, None, None
    best = BestAccuracy(ckpt.get('best') if ckpt is not None else None)
    if ckpt is not None:
        restore_weights(ckpt, ckpt_path, model, model_ema)
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        if aux_optimizer is not None:
            criterion.load_state_dict(ckpt['criterion'])
            aux_optimizer.load_state_dict(ckpt['aux_optimizer'])
        start_epoch, start_step = resume_step(ckpt, ckpt_path, args.batch_size, world, steps_per_epoch)
        if start_step:
            start_rng, partial = resume_rng(ckpt, rank, world, args.batch_size), ckpt.get('partial_epoch')
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_step}"
            + (f" of {steps_per_epoch} ({samples_done(ckpt)} samples of the epoch done)" if start_step else ''))
        last_good = describe_checkpoint(ckpt_path, ckpt['epoch'], ckpt.get('step'))
    ddp_model = wrap_ddp(model, args)

    log_writer = None
    if is_main_process():
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            # points up to the resumed position (epoch_1000x, as the engine writes them) were trained: keep them
            position = int((start_epoch + start_step / steps_per_epoch) * 1000)
            log_writer = SummaryWriter(log_dir=args.log_dir, purge_step=position + 1 if position else None)

    def save(epoch: int, step: int | None, partial: dict | None = None, extra_names: tuple[str, ...] = ()) -> None:
        """checkpoint.pth (and ``extra_names``) on rank 0, unless any rank's state holds NaN or inf."""
        nonlocal last_good
        if not args.output_dir:
            return
        state = checkpoint_state(model, model_ema, optimizer, scaler, criterion, aux_optimizer, args, epoch, step,
                                 best, partial)
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        check_finite(state, describe_checkpoint(path, epoch, step), last_good, device)
        if is_main_process():
            save_atomic(state, path)
            for name in extra_names:
                save_atomic(state, os.path.join(args.output_dir, name))
        barrier()
        last_good = describe_checkpoint(path, epoch, step)

    control = RunControl(args.checkpoint_minutes, save)
    log(f"start training for {args.epochs} epochs ({steps_per_epoch} steps each) from epoch {start_epoch}"
        + (f", step {start_step}" if start_step else ''))
    start_time, stats = time.time(), {}
    best_key = {'raw': 'test_acc1', 'ema': 'ema_test_acc1'}.get(args.save_best)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank, loader_train.generator)
        first_step = start_step if epoch == start_epoch else 0
        if first_step and start_rng is not None:
            set_rng_state(start_rng)
        sampler_train.set_epoch(epoch, start_index=first_step * args.batch_size)
        try:
            train_stats = train_one_epoch(
                ddp_model, criterion, loader_train, optimizer, device, epoch, scaler, args, amp_dtype=amp_dtype,
                mixup_fn=mixup_fn, model_ema=model_ema, ema_source=model.student, log_writer=log_writer,
                aux_optimizer=aux_optimizer, partial=partial if first_step else None,
                start_step=first_step, steps_per_epoch=steps_per_epoch, control=control)
        except NonFiniteLossError as e:
            e.args = (f"{e} Training stopped; " + last_good_sentence(last_good),)
            raise
        last = epoch + 1 == args.epochs
        keep = args.save_every and ((epoch + 1) % args.save_every == 0 or last)
        numbered = (f'checkpoint-{epoch}.pth',) if keep else ()
        save(epoch, None, extra_names=numbered)

        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, 'n_parameters': n_parameters}
        # a stop agreed at the epoch's last step: no evaluation now (the run itself ends after the last epoch)
        stopping = control.stop_at_epoch_end is not None and not last
        if not stopping and ((epoch + 1) % args.eval_every == 0 or last):
            test_stats = eval_all(model, model_ema)
            stats.update(test_stats)
            improved = best.update(test_stats, epoch)
            stats.update(best.log_fields())
            if improved:  # this epoch's checkpoints are written again so that a resume continues the same record
                save(epoch, None, extra_names=numbered + (('checkpoint-best.pth',) if best_key in improved else ()))
            if best_key in improved:
                log(f"checkpoint-best.pth: epoch {epoch}, {best_key} {test_stats[best_key]:.2f}%")
            log(best.summary(test_stats))
            if log_writer is not None:
                for k, v in test_stats.items():
                    if k.endswith(('acc1', 'acc5', 'loss')):
                        log_writer.add_scalar(f"perf/{k}", v, epoch)
        write_log(args, stats)
        if log_writer is not None:
            log_writer.flush()
        if not last:
            control.stop_after_epoch()

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


def run_reporting_stop(argv=None) -> dict:
    """run(), with a requested stop (SIGINT / SIGTERM) reported in one line: its checkpoint is written."""
    try:
        return run(argv)
    except Preempted as stop:
        print(f"stopped: checkpoint written at epoch {stop.epoch}, step {stop.step}; continue with --resume allow",
              file=sys.stderr, flush=True)
        os._exit(128 + stop.signum if stop.signum else 1)


if __name__ == '__main__':
    run_cli(run_reporting_stop)
