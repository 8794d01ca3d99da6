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
import contextlib
import datetime
import json
import os
import sys
import time

import torch
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3

import modes
from engine_finetune import NonFiniteLossError, evaluate, evaluate_ensemble, train_one_epoch
from models_dual_vit import ATTENTION_IMPL_CHOICES, DualViT, create_vit, resolve_attention_impl, resolve_model_name
from modes import MODES, PlainTraining, get_mode, student_architecture
from util.args import (
    HelpFormatter,
    annotate_mode_defaults,
    check_values,
    explicit_flags,
    parse_kwargs,
)
from util.checkpoint import (
    check_finite,
    check_resume_matches,
    checkpoint_state,
    describe_checkpoint,
    last_good_sentence,
    load_training_checkpoint,
    next_position,
    restore_weights,
    resume_path,
    resume_rng,
    resume_step,
    samples_done,
    save_atomic,
    seed_epoch,
    set_rng_state,
)
from util.datasets import LAYOUT, DataError, build_dataset, build_loader
from util.distributed import (
    barrier,
    destroy,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    log,
    wrap_ddp,
)
from util.errors import UserError, run_cli
from util.eval_classes import RestrictedClassifier, check_class_folders, read_eval_classes
from util.lr_sched import Schedule, lr_floor_warning
from util.output import (
    EVAL_RESULTS,
    BestAccuracy,
    check_inputs_not_overwritten,
    check_output_folders,
    check_run_folder,
    checkpoint_bytes,
    epoch_end_missing,
    finished,
    open_log_writer,
    output_dir_in_use,
    trim_log,
    warn_if_little_space,
    write_eval_results,
    write_log,
)
from util.precision import AMP_DTYPES, default_amp
from util.pretrained import (
    LoadReport,
    checkpoint_architecture,
    is_named,
    load_pretrained_weights,
    local_checkpoint,
    pool_of_state_dict,
    read_checkpoint,
    select_state_dict,
)
from util.run_control import Preempted, RunControl, stop_on_signals
from util.samplers import ResumableDistributedSampler, ShardSampler, check_same_permutation, dataset_fingerprint

# The arguments that define the model: --eval --resume takes them from the checkpoint.
MODEL_ARGS = ('model', 'mode', 'teacher_model', 'student_model', 'model_kwargs', 'student_kwargs', 'input_size',
              'nb_classes', 'global_pool', 'transfer_layers', 'end_layer', 'share_drop_path', 'probe_blocks',
              'eval_crop_pct', 'transfer_heads', 'map_average')
DEFAULT_MODEL = 'vit_large_patch16'


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
    g.add_argument('--end_layer', default=0, type=int,
                   help='transfer layers [0, depth + end_layer); 0 = all layers, -6 = all but the last 6')
    g.add_argument('--transfer_layers', default=None, type=str,
                   help='explicit transferred layers, e.g. 0-17 or 0,2,4 (overrides --end_layer)')
    g.add_argument('--transfer_heads', default=None, type=str, metavar='N|HEADS',
                   help='heads of each transferred layer that are transferred: N = the first N heads, or indices '
                        'such as 0,2 or 4-7 (one head by index: 3-3); the other heads attend on their own, and in '
                        'distill modes the loss is that of the transferred heads alone (default: all heads)')
    g.add_argument('--map_average', default='none', choices=['none', 'examples', 'queries'],
                   help='copy / distill: replace the teacher\'s maps, before they are copied or distilled, by their '
                        'mean over the images of the batch on each GPU (examples: every image gets the same map) or '
                        'over the query positions (queries: every query of an image gets the same row of key '
                        'weights); needs explicit maps (--attention_impl auto or explicit)')
    g.add_argument('--atd_weight', default=3, type=float,
                   help='weight of the attention distillation loss (distill modes; the transfer loss of every mode '
                        'that has one)')
    g.add_argument('--transfer_until', default=None, type=float, metavar='EPOCH',
                   help='modes with a transfer loss: its weight is --atd_weight before EPOCH (counted in epochs from '
                        '0, fractions allowed) and 0 from then on, so the term and its gradient vanish (default: '
                        'the whole run)')
    g.add_argument('--transfer_decay', default='step', choices=['step', 'linear'],
                   help='with --transfer_until: step keeps the full weight until EPOCH; linear lowers it at every '
                        'step, --atd_weight x (1 - epoch / EPOCH), to 0 at EPOCH')
    g.add_argument('--no_share_drop_path', action='store_false', dest='share_drop_path',
                   help='draw the student\'s stochastic-depth masks alone instead of sharing them with the teacher')
    g.add_argument('--train_qkv', action='store_true', help='train only the student\'s qkv, head and fc_norm')
    g.add_argument('--attention_impl', default='auto', choices=list(ATTENTION_IMPL_CHOICES),
                   help='fused: every mode through scaled_dot_product_attention, the teacher handing over q/k/v and '
                        'the distillation loss computed through the attention kernels, so no N x N map is stored; '
                        'explicit: N x N attention maps in float32 (same numbers; faster on CPU at ViT sizes); '
                        'auto: fused on CUDA, explicit on CPU (default: %(default)s; the choice is printed at start '
                        'and recorded in checkpoints)')

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
                   help='mix the first N labelled originals of each class of the target task\'s training split '
                        '(--eval_data_path/train) into the selected images, aspect ratio kept, as the reference\'s '
                        'ImageNet script')
    g.add_argument('--class_weights', default='augmented', choices=['augmented', 'selection'],
                   help='--robust: class-balance weights from a pass over the selection (and the --pos_num '
                        'originals) with the training augmentation, as the reference (cached beside the selection), '
                        'or from the unaugmented scoring pass stored in the selection file')
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
    g.add_argument('--presentations', default=modes.PROBE_PRESENTATIONS, type=int,
                   help='probe mode without --epochs: train int(presentations / selected images) - 1 epochs, as the '
                        'reference (default 320000 x 512: 251 epochs for 650,000 selected images; its ImageNet '
                        'script: 640000 x 512); --pos_num originals are not counted')
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
    g.add_argument('--student_init', default='', metavar='CKPT|NAME',
                   help='transfer and distillation modes: start the student from these pre-trained weights instead of '
                        'a random initialisation (a file or a name, as --finetune, loaded and reported the same way; '
                        'a checkpoint without a classifier for --nb_classes leaves the head freshly initialised); '
                        'not used when resuming')
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
    for name, mode in MODES.items():
        annotate_mode_defaults(p, mode.defaults, name)
    return p

# ---------------------------------------------------------------------------------------------
# Flags -> a resolved run
# ---------------------------------------------------------------------------------------------
def adopt_checkpoint_args(args, saved: dict) -> None:
    """--eval --resume: the model's arguments from the checkpoint, and the normalisation it was trained with
    unless --mean / --std are given."""
    for key in MODEL_ARGS:
        if key in saved:
            setattr(args, key, saved[key])
    for key in ('mean', 'std'):
        if getattr(args, key, None) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])


def resolve_args(args, read_resume: bool = True) -> tuple[dict | None, str | None]:
    """Fill derived defaults and check the flags before any heavy work; returns (checkpoint to resume, its path).

    ``read_resume=False`` (the SLURM launcher, at submission) only checks that the checkpoint exists."""
    check_values(args)
    check_output_folders(args)
    args.model_kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    args.student_kwargs = parse_kwargs(args.student_kwargs, '--student_kwargs')
    path = resume_path(args.resume, args.output_dir)
    ckpt = load_training_checkpoint(path, to_train=not args.eval) if path and read_resume else None
    if ckpt is not None and args.eval and isinstance(ckpt.get('args'), dict):
        adopt_checkpoint_args(args, ckpt['args'])
    mode = get_mode(args.mode)
    args.mode = mode.name
    check_resume_matches(ckpt, path, args, mode.uses_teacher)
    if getattr(args, 'log_dir', None) is None:
        args.log_dir = args.output_dir
    if not args.eval:
        mode.apply_defaults(args)
    if args.amp is None:
        args.amp = default_amp(args.device)
    if args.attention_impl == 'auto' and getattr(args, 'map_average', 'none') != 'none':
        args.attention_impl = 'explicit'  # the averaged maps exist only as explicit maps
    if args.attention_impl == 'auto':
        args.attention_impl = resolve_attention_impl('auto', args.device)
        if mode.uses_teacher:
            log(f"attention: {args.attention_impl} (--attention_impl auto on {args.device})")
    args.mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if args.finetune:
        local_checkpoint(args.finetune, '--finetune')  # a name is resolved (downloaded) here, a missing file refused
        follow_finetune_source(args, mode)
    if getattr(args, 'student_init', '') and not args.eval:
        if not mode.student_init:
            raise UserError(f"--student_init initialises the student of a transfer or distillation mode; --mode "
                            f"{mode.name} takes its starting weights from --finetune: use that instead")
        local_checkpoint(args.student_init, '--student_init')  # a name is resolved here, a missing file refused
    if not args.model:
        args.model = DEFAULT_MODEL
    args.mean = list(args.mean or IMAGENET_DEFAULT_MEAN)
    args.std = list(args.std or IMAGENET_DEFAULT_STD)
    resolve_model_name(args.model)
    if args.teacher_model:
        resolve_model_name(args.teacher_model)
    # the student is recorded completely in every checkpoint: its timm name and arguments
    _, teacher_kwargs, _ = (mode.evaluated_as() if args.eval else mode).teacher_architecture(args)
    student, args.student_kwargs = student_architecture(args, teacher_kwargs)
    args.student_model = resolve_model_name(student)

    args.eval_data_path = args.eval_data_path or args.data_path
    if not args.eval_data_path:
        raise UserError("give --data_path: a folder holding train/<class>/ and val/<class>/" + mode.data_hint)
    splits = [(args.eval_data_path, 'val')]
    if not args.eval and mode.trains_on_labels:
        splits.append((args.data_path, 'train'))
    for root, split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{split} data not found: {os.path.join(root, split)!r} is not a directory. "
                            f"Expected the layout {LAYOUT}.")
    if args.eval_crop_pct is None:
        args.eval_crop_pct = mode.default_eval_crop_pct(args.input_size, os.path.join(args.eval_data_path, 'val'))
    if not 0.0 < args.eval_crop_pct <= 1.0:
        raise UserError(f"--eval_crop_pct {args.eval_crop_pct}: the crop fraction must be in (0, 1] (1.0: evaluate "
                        "the image at the input size, uncropped; 0.875: MAE's ImageNet evaluation)")

    if read_resume or not path:  # at submission the resumed epoch is unknown: the job checks it
        check_inputs_not_overwritten(args, next_position(ckpt)[0] if ckpt is not None else args.start_epoch)
    check_run_folder(args, path)
    has_teacher_weights = (ckpt is not None and 'teacher' in ckpt) or (path is not None and not read_resume)
    if mode.needs_teacher(args.eval) and not args.finetune and not has_teacher_weights:
        raise UserError(f"mode {mode.name} needs the teacher's weights: --finetune PATH ({mode.teacher_hint})")
    mode.check(args)
    if args.save_best == 'ema' and args.ema is None and not args.eval:
        raise UserError("--save_best ema keeps the checkpoint of the best EMA top-1, but there is no EMA: add --ema "
                        "DECAY (e.g. --ema 0.9999), or use --save_best (raw weights)")
    if getattr(args, 'eval_classes', ''):
        if not args.eval:
            raise UserError("--eval_classes restricts an evaluation's logits: add --eval (and --resume CKPT)")
        read_eval_classes(args.eval_classes, args.nb_classes)
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


def follow_finetune_source(args, mode: PlainTraining) -> None:
    """What the --finetune checkpoint says about its model: a name (timm:, hf-hub:) gives the architecture
    when --model / --teacher_model are not set, and its pretrained config's mean and std; a teacher checkpoint
    of this project (modes whose teacher comes from its checkpoint) gives the normalisation it was trained with.
    --mean / --std override; ImageNet's are the fallback. (Other local files are not read here: MAE's and
    timm's record no normalisation, and a large teacher would be read twice.)"""
    arch = checkpoint_architecture(args.finetune) if is_named(args.finetune) or mode.teacher_from_checkpoint else None
    if arch is None:
        return
    if is_named(args.finetune) and not args.model and not args.teacher_model:
        args.model = arch['model']
        args.model_kwargs = {**arch['model_kwargs'], **args.model_kwargs}
        log(f"architecture from --finetune {args.finetune}: {args.model} {args.model_kwargs}")
        pool_given = 'global_pool' in (getattr(args, 'explicit_flags', None) or ())
        if args.eval and not mode.uses_teacher and not pool_given:  # evaluating the named classifier as it is
            args.global_pool = arch['global_pool'] or pool_of_state_dict(select_state_dict(
                read_checkpoint(args.finetune)))
    if arch.get('mean') is not None and arch.get('std') is not None and (args.mean is None or args.std is None):
        args.mean = args.mean or list(arch['mean'])
        args.std = args.std or list(arch['std'])
        log(f"input normalisation: mean {args.mean}, std {args.std} (the --finetune teacher's; --mean / --std "
            "override)")


# ---------------------------------------------------------------------------------------------
# Model, optimizer and distributed wrapper
# ---------------------------------------------------------------------------------------------
def build_model(args, eval_only: bool = False) -> torch.nn.Module:
    """The mode's model: the teacher/student pair (the student alone in plain mode), or to evaluate, what
    the saved model is evaluated as (a distilled student is a plain ViT)."""
    mode = get_mode(args.mode)
    return (mode.evaluated_as() if eval_only else mode).build_model(args)


def param_groups(model: torch.nn.Module, mode: PlainTraining, args) -> list[dict]:
    """The student's AdamW groups, as the mode forms them (layer-wise lr decay, weight decay exemptions)."""
    return mode.param_groups(model.student, args)


def load_initial_weights(model: DualViT, args, ckpt: dict | None) -> None:
    """--finetune: the teacher's weights in transfer modes (unless the checkpoint holds them), the
    student's starting point in plain mode (unless a checkpoint is resumed)."""
    if not args.finetune:
        return
    if model.teacher is not None:
        if args.eval and ckpt is None:
            raise UserError(f"--eval --mode {args.mode} evaluates a trained student, which --finetune (the teacher) "
                            "does not hold: give the run's checkpoint with --resume CKPT")
        if ckpt is None or 'teacher' not in ckpt:
            log(f"teacher: {model.load_teacher(args.finetune, use_ema=args.use_teacher_ema, flag='--finetune')}")
        if getattr(args, 'student_init', '') and ckpt is None and not args.eval:
            load_student_init(model.student, args.student_init)
    elif ckpt is None:
        report = load_pretrained_weights(model.student, args.finetune, use_ema=args.use_teacher_ema, flag='--finetune')
        log(f"student: {report}")
        if args.eval:
            require_classifier_head(report, '--finetune', args.finetune, args.nb_classes)
        if 'head.weight' not in report.loaded and hasattr(model.student.head, 'weight'):
            trunc_normal_(model.student.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation


def load_student_init(student: torch.nn.Module, spec: str) -> None:
    """--student_init: the student's starting weights in a transfer mode, loaded as --finetune loads a plain
    model's (key report; MAE's head initialisation when the checkpoint has no head for these classes)."""
    report = load_pretrained_weights(student, spec, flag='--student_init')
    log(f"student (--student_init): {report}")
    if 'head.weight' not in report.loaded and hasattr(student.head, 'weight'):
        trunc_normal_(student.head.weight, std=2e-5)


def require_classifier_head(report: LoadReport, flag: str, path: str, nb_classes: int) -> None:
    """An evaluated model must have loaded a classifier head for this task's classes: a pre-training
    checkpoint has none and a classifier of another label set has one of another shape, and either would
    be scored with a random head."""
    if 'head.weight' in report.loaded:
        return
    raise UserError(f"{flag} {path}: no classifier head for {nb_classes} classes was loaded (the checkpoint has "
                    "none, as a pre-training checkpoint, or one for another number of classes), so the evaluation "
                    "would score a random head. Evaluate a classifier trained on this task's classes (--nb_classes "
                    "must match its head), or a run's checkpoint with --resume CKPT")


def restrict_to_qkv(student: torch.nn.Module) -> None:
    """--train_qkv: freeze everything but the qkv projections, the head and fc_norm."""
    for name, param in student.named_parameters():
        param.requires_grad = 'qkv' in name or name.startswith(('head.', 'fc_norm.'))


def load_ensemble_member(args) -> torch.nn.Module:
    """The model of --ensemble_with: a checkpoint of this project (any mode), a classifier checkpoint
    of --ensemble_model / --model's architecture (e.g. an MAE fine-tuned ViT), or a named classifier
    (timm:NAME.tag, hf-hub:ORG/NAME: its own architecture; an https:// URL)."""
    path = args.ensemble_with
    ckpt = read_checkpoint(local_checkpoint(path, '--ensemble_with'), flag='--ensemble_with')
    if isinstance(ckpt, dict) and isinstance(ckpt.get('args'), dict) and 'model' in ckpt['args']:
        member_args = argparse.Namespace(**{**vars(args), **{k: ckpt['args'][k] for k in MODEL_ARGS
                                                           if k in ckpt['args']}, 'finetune': ''})
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
    require_classifier_head(report, '--ensemble_with', path, args.nb_classes)
    log(f"ensemble member: {report}")
    return member


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    init_distributed_mode(args)
    ckpt, ckpt_path = resolve_args(args)
    if not args.eval and finished(ckpt, ckpt_path, get_mode(args.mode).known_epochs(args), args.output_dir):
        destroy()
        return {}
    with output_dir_in_use(args), stop_on_signals(enabled=not args.eval):
        return train_and_evaluate(args, ckpt, ckpt_path)


class Evaluator:
    """Top-1/top-5 and loss on the evaluation set of the raw weights (``test_*``) and, with an EMA, of the
    EMA student in the same model (``ema_test_*``)."""

    def __init__(self, loader, device: torch.device, amp_dtype, args) -> None:
        self.loader, self.device, self.amp_dtype = loader, device, amp_dtype
        self.dist_eval, self.print_freq = args.dist_eval, args.print_freq

    def __call__(self, model: DualViT, ema=None) -> dict:
        stats = {f'test_{k}': v for k, v in evaluate(self.loader, model, self.device, self.amp_dtype, self.dist_eval,
                                                     name='model', print_freq=self.print_freq).items()}
        if ema is not None:
            ema_stats = evaluate(self.loader, model.with_student(ema.module), self.device, self.amp_dtype,
                                 self.dist_eval, name='EMA', print_freq=self.print_freq)
            stats.update({f'ema_test_{k}': v for k, v in ema_stats.items()})
        return stats


def build_eval_dataset(args):
    """The evaluation set: --eval_data_path/val, whose class folders are the model's classes or, with
    --eval_classes, those of the subset."""
    root = os.path.join(args.eval_data_path, 'val')
    if not getattr(args, 'eval_classes', ''):
        return build_dataset(False, args, root=root)
    subset = read_eval_classes(args.eval_classes, args.nb_classes)
    dataset = build_dataset(False, args, root=root, nb_classes=len(subset.indices))
    check_class_folders(dataset.classes, subset, args.eval_classes, root)
    return dataset


def restrict_classes(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model scored on --eval_classes alone (the model itself without)."""
    if not getattr(args, 'eval_classes', ''):
        return model
    subset = read_eval_classes(args.eval_classes, args.nb_classes)
    log(f"--eval_classes {args.eval_classes}: logits restricted to {len(subset.indices)} of {args.nb_classes} classes")
    return RestrictedClassifier(model, subset.indices).to(next(model.parameters()).device)


def evaluate_only(args, model, ckpt: dict | None, ckpt_path: str | None, evaluator: Evaluator, device,
                  amp_dtype) -> dict:
    """--eval: the checkpoint's raw and EMA weights, or with --ensemble_with both models and their average."""
    model_ema = None
    if ckpt is not None:
        model_ema = ModelEmaV3(model.student) if 'model_ema' in ckpt else None
        restore_weights(ckpt, ckpt_path, model, model_ema)
    model = restrict_classes(model, args)
    if args.ensemble_with:
        models = {'model': model, 'other': restrict_classes(load_ensemble_member(args).to(device), args)}
        results = evaluate_ensemble(evaluator.loader, models, device, amp_dtype, args.dist_eval, args.print_freq)
        stats = {f'{prefix}{k}': v for name, prefix in (('model', 'test_'), ('other', 'other_test_'),
                                                         ('ensemble', 'ensemble_test_'))
                 for k, v in results[name].items()}
    else:
        stats = evaluator(model, model_ema)
    write_eval_results(args, stats, ckpt_path)
    return stats


def restore_training_state(ckpt: dict, ckpt_path: str, model, model_ema, optimizer, scaler, criterion,
                           aux_optimizer, args, steps_per_epoch: int, data: dict
                           ) -> tuple[int, int, dict | None, dict | None]:
    """Weights, optimizers and the position from a checkpoint; returns (epoch, step, this rank's generator
    states to continue the epoch with, the epoch's loss sums so far). A mid-epoch checkpoint continues only
    with the same training set and --seed (``data``: this run's ``dataset_fingerprint``)."""
    restore_weights(ckpt, ckpt_path, model, model_ema)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if aux_optimizer is not None:
        criterion.load_state_dict(ckpt['criterion'])
        aux_optimizer.load_state_dict(ckpt['aux_optimizer'])
    world = get_world_size()
    epoch, step = resume_step(ckpt, ckpt_path, args.batch_size, world, steps_per_epoch)
    rng, partial = None, None
    if step:
        rng, partial = resume_rng(ckpt, get_rank(), world, args.batch_size), ckpt.get('partial_epoch')
    if step:
        check_same_permutation(ckpt, ckpt_path, args.seed, data, epoch)
    log(f"resumed from {ckpt_path}: epoch {epoch}, step {step}"
        + (f" of {steps_per_epoch} ({samples_done(ckpt)} samples of the epoch done)" if step else ''))
    return epoch, step, rng, partial


def train_and_evaluate(args, ckpt: dict | None, ckpt_path: str | None) -> dict:
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    mode = get_mode(args.mode)
    log(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    log(json.dumps(vars(args), indent=1, default=str))
    torch.backends.cudnn.benchmark = True
    seed_epoch(args.seed, 0, rank)

    dataset_val = build_eval_dataset(args)
    dataset_train = None if args.eval else mode.train_dataset(args)
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
    model_ema = ModelEmaV3(model.student, decay=args.ema) if args.ema is not None and not args.eval else None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile:  # after the EMA's deep copy, which must not share the compiled blocks
        model.compile_blocks()
    n_parameters = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    log(f"student: {type(model.student).__name__} {model.student.default_cfg.get('architecture')}, "
        f"{n_parameters / 1e6:.2f}M trainable parameters; mode {mode.name}"
        + (f", transferred layers {model.layers}" if model.layers else ''))
    evaluator = Evaluator(loader_val, device, amp_dtype, args)
    if args.eval:
        stats = evaluate_only(args, model, ckpt, ckpt_path, evaluator, device, amp_dtype)
        destroy()
        return stats


    eff_batch_size = args.batch_size * args.accum_iter * world
    lr = args.lr if args.lr is not None else args.blr * eff_batch_size / 256
    log(f"base lr: {lr * 256 / eff_batch_size:.2e}  actual lr: {lr:.2e}  "
        f"accumulate grad iterations: {args.accum_iter}  effective batch size: {eff_batch_size}")
    if args.min_lr > lr and is_main_process():
        print(lr_floor_warning(lr, args.min_lr, eff_batch_size, args.accum_iter), file=sys.stderr, flush=True)
    schedule = Schedule.from_args(args, lr=lr, epochs=mode.epochs(args, dataset_train))
    if finished(ckpt, ckpt_path, schedule.epochs, args.output_dir):  # epochs the training set gave
        destroy()
        return {}
    sampler_train = ResumableDistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    loader_train = build_loader(dataset_train, sampler_train, args, train=True)
    steps_per_epoch = sampler_train.num_samples // args.batch_size  # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset_train)} training images on {world} processes make no full batch of "
                        f"{args.batch_size}; lower --batch_size")

    optimizer = torch.optim.AdamW(param_groups(model, mode, args), lr=lr, betas=(0.9, args.beta2),
                                  fused=device.type == 'cuda')
    mixup_fn = None
    if args.mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    criterion = mode.criterion(args, model, loader_val, device, amp_dtype).to(device)
    aux_params = [p for p in criterion.parameters() if p.requires_grad]
    aux_optimizer = torch.optim.Adam(aux_params, lr=args.noise_lr) if aux_params else None
    # what checkpoints record as their args: the flags and the values resolved from them
    data = dataset_fingerprint(dataset_train)
    record = {**vars(args), 'lr': lr, 'epochs': schedule.epochs, 'train_data': data,
              **mode.recorded_args(args, criterion)}

    if is_main_process() and args.output_dir:
        saved = [model.student, criterion] + ([model_ema.module] if model_ema is not None else []) \
            + ([model.teacher] if model.needs_teacher_at_eval else [])
        warn_if_little_space(args.output_dir, checkpoint_bytes(saved, optimizer), bool(args.save_every))

    start_epoch, start_step, start_rng, partial, last_good = args.start_epoch, 0, None, None, None
    best = BestAccuracy(ckpt.get('best') if ckpt is not None else None)
    if ckpt is not None:
        start_epoch, start_step, start_rng, partial = restore_training_state(
            ckpt, ckpt_path, model, model_ema, optimizer, scaler, criterion, aux_optimizer, args, steps_per_epoch,
            data)
        last_good = describe_checkpoint(ckpt_path, ckpt['epoch'], ckpt.get('step'))
        trim_log(args.output_dir, start_epoch)
    ddp_model = wrap_ddp(model, args)
    log_writer = open_log_writer(args, int((start_epoch + start_step / steps_per_epoch) * 1000))

    def save(epoch: int, step: int | None, partial: dict | None = None, extra_names: tuple[str, ...] = (),
             epoch_stats: dict | None = None) -> None:
        """``extra_names`` and then checkpoint.pth on rank 0, unless any rank's state holds NaN or inf: the record
        of checkpoint.pth (its best accuracies) never points at a file that was not written."""
        nonlocal last_good
        if not args.output_dir:
            return
        state = checkpoint_state(model, model_ema, optimizer, scaler, criterion, aux_optimizer, record, epoch, step,
                                 best.best, partial, epoch_stats)
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        check_finite(state, describe_checkpoint(path, epoch, step), last_good, device)
        if is_main_process():
            for name in extra_names:
                save_atomic(state, os.path.join(args.output_dir, name))
            save_atomic(state, path)
        barrier()
        last_good = describe_checkpoint(path, epoch, step)

    best_key = {'raw': 'test_acc1', 'ema': 'ema_test_acc1'}.get(args.save_best)

    def numbered(epoch: int) -> tuple[str, ...]:
        keep = args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == schedule.epochs)
        return (f'checkpoint-{epoch}.pth',) if keep else ()

    def end_epoch(epoch: int, train_stats: dict, evaluate_now: bool) -> dict:
        """After the epoch's checkpoint: its evaluation (a better top-1 rewrites the epoch's checkpoints, and
        checkpoint-best.pth with --save_best) and its log.txt line."""
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, 'n_parameters': n_parameters}
        if evaluate_now:
            test_stats = evaluator(model, model_ema)
            stats.update(test_stats)
            improved = best.update(test_stats, epoch)
            stats.update(best.log_fields())
            if improved:  # this epoch's checkpoints are written again so that a resume continues the same record
                save(epoch, None, extra_names=numbered(epoch) + (('checkpoint-best.pth',) if best_key in improved
                                                                 else ()), epoch_stats=train_stats)
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
        return stats

    def due(epoch: int) -> bool:
        return (epoch + 1) % args.eval_every == 0 or epoch + 1 == schedule.epochs

    stats = {}
    if epoch_end_missing(ckpt, ckpt_path, args.output_dir):
        log(f"finishing epoch {ckpt['epoch']} of {ckpt_path}: its evaluation and log.txt line were not written")
        stats = end_epoch(ckpt['epoch'], ckpt['epoch_stats'], due(ckpt['epoch']))
    control = RunControl(args.checkpoint_minutes, save)
    log(f"start training for {schedule.epochs} epochs ({steps_per_epoch} steps each) from epoch {start_epoch}"
        + (f", step {start_step}" if start_step else ''))
    start_time = time.time()
    for epoch in range(start_epoch, schedule.epochs):
        seed_epoch(args.seed, epoch, rank, loader_train.generator)
        first_step = start_step if epoch == start_epoch else 0
        if first_step and start_rng is not None:
            set_rng_state(start_rng)
        sampler_train.set_epoch(epoch, start_index=first_step * args.batch_size)
        try:
            train_stats = train_one_epoch(
                ddp_model, criterion, loader_train, optimizer, device, epoch, scaler, args, schedule,
                amp_dtype=amp_dtype, mixup_fn=mixup_fn, model_ema=model_ema, ema_source=model.student,
                log_writer=log_writer, aux_optimizer=aux_optimizer, partial=partial if first_step else None,
                start_step=first_step, steps_per_epoch=steps_per_epoch, control=control)
        except NonFiniteLossError as e:
            e.args = (f"{e} Training stopped; " + last_good_sentence(last_good),)
            raise
        last = epoch + 1 == schedule.epochs
        try:
            save(epoch, None, extra_names=numbered(epoch), epoch_stats=train_stats)
        except UserError:  # e.g. a full disk: the epoch's line still goes into log.txt (it is trained again)
            with contextlib.suppress(OSError):
                write_log(args, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
            raise
        # a stop agreed at the epoch's last step: no evaluation now (the run itself ends after the last epoch)
        stopping = control.stop_at_epoch_end is not None and not last
        stats = end_epoch(epoch, train_stats, not stopping and due(epoch))
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
