"""COCO object detection and instance segmentation with a ViT backbone: from scratch, by fine-tuning a
pre-trained ViT, or with attention copied or distilled from a frozen teacher at detection resolution (the
detection table of Li et al., NeurIPS 2024). The detection counterpart of main_finetune.py.

    # the table's four runs (ViT-B, ViTDet's recipe: 64 images a step, 100 epochs, 1024 px)
    torchrun --nproc_per_node 8 main_detection.py --mode none --data_path $COCO --batch_size 2 --accum_iter 4 \\
        --output_dir runs/det_scratch --resume allow
    torchrun --nproc_per_node 8 main_detection.py --mode none --finetune mae_pretrain_vit_base.pth ...
    torchrun --nproc_per_node 8 main_detection.py --mode copy --finetune mae_pretrain_vit_base.pth ...
    torchrun --nproc_per_node 8 main_detection.py --mode distill --finetune mae_pretrain_vit_base.pth ...

Flow: arguments -> COCO data (--data_path: train2017/, val2017/, annotations/instances_{train,val}2017.json)
-> the detector (models_detection: a timm ViT student with windowed and global blocks, ViTDet's simple feature
pyramid, torchvision's Mask R-CNN heads) with, for transfer modes, the teacher (--finetune) beside its student
-> AdamW with layer-wise lr decay over the backbone -> resume -> epochs of engine_finetune's train_one_epoch
(util.run_loop: checkpoints inside epochs, stops, requeue) -> box and mask AP from pycocotools (util.coco_eval)
at --eval_every and the last epoch, in log.txt and TensorBoard. docs/DETECTION.md is the manual.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay

from engine_finetune import TrainingStep
from models_attention import ATTENTION_IMPL_CHOICES, WIRING, resolve_attention_impl
from models_detection import DetectionTrunk, TransferDetector, ViTDetector, evenly_spaced_blocks
from models_pairing import parse_heads, parse_indices, resolve_pairing
from models_spec import Architecture
from models_transfer_losses import FUSED_TRANSFER_LOSSES, TRANSFER_LOSSES
from models_vit import init_class_token
from util.args import (
    HelpFormatter,
    Parser,
    add_amp_argument,
    add_distributed_arguments,
    add_loader_arguments,
    add_lr_arguments,
    add_run_arguments,
    check_normalization,
    check_positive,
    check_range,
    flag_names,
    parse_kwargs,
    run_command,
    usable_workers,
)
from util.checkpoint import (
    Checkpointer,
    Weights,
    check_resume_matches,
    holds_teacher,
    load_training_checkpoint,
    next_position,
    recorded_args,
    saved_position,
    seed_epoch,
    start_epoch,
)
from util.coco_eval import coco_evaluate, gather_image_ids, gather_results, to_coco_results
from util.config import Config
from util.datasets import build_loader, pins_memory
from util.detection_data import build_coco_dataset, coco_paths, collate_detection
from util.distributed import (
    all_reduce_sum,
    destroy,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    log,
    wrap_ddp,
)
from util.errors import UserError, run_cli
from util.lr_decay import param_groups_lrd
from util.lr_sched import Schedule, learning_rate
from util.model_record import changed_flags, flag_errors
from util.output import (
    INPUT_FLAGS,
    RunFolder,
    atomic_write_text,
    check_inputs_not_overwritten,
    check_output_folders,
    output_dir_in_use,
    requeued_checkpoint,
    resume_path,
    write_eval_results,
    write_log,
)
from util.precision import AMP_DTYPES, default_amp
from util.pretrained import load_exact, load_pretrained_weights
from util.run_control import reporting_stop, stop_on_signals
from util.run_loop import EpochEnd, RunLoop, RunParts, check_run_folder, finished
from util.run_record import Console
from util.samplers import ShardSampler, dataset_fingerprint
from util.tracking import add_tracking_arguments, check_wandb

DEFAULT_MODEL = 'vit_base_patch16_224'
PREDICTIONS = 'coco_instances_results.json'  # --eval's predictions, in COCO's results format
DETECTION_MODES = tuple(WIRING)  # none (no teacher) and the transfer modes
# the flags that make the detector: a resumed run keeps them (its weights and optimizer state have their shapes)
ARCHITECTURE_FLAGS = ('model', 'model_kwargs', 'input_size', 'window_size', 'global_blocks', 'mode',
                      'transfer_layers', 'fpn_channels')  # and the categories, checked against the annotations
# what --eval --resume takes from the checkpoint's run unless the command gives it
EVALUATED_FLAGS = ARCHITECTURE_FLAGS + ('nb_classes', 'transfer_heads', 'mean', 'std')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('Detection with attention transfer', add_help=False)
    p.add_argument('--batch_size', default=2, type=int,
                   help='images per GPU and step (effective batch size is batch_size * accum_iter * # gpus; '
                        'ViTDet\'s recipe: 64)')
    p.add_argument('--epochs', default=100, type=int, help='training epochs (ViTDet\'s ViT-B recipe: about 100)')
    p.add_argument('--accum_iter', default=1, type=int,
                   help='accumulate gradients over this many steps (a larger effective batch in less memory)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=DEFAULT_MODEL, metavar='MODEL',
                   help='timm ViT architecture of the teacher and of the student backbone (the student mirrors the '
                        'teacher), e.g. vit_base_patch16_224; an MAE checkpoint\'s weights load into it')
    g.add_argument('--model_kwargs', default={}, nargs='*', metavar='KEY=VALUE',
                   help='timm architecture arguments of both, e.g. patch_size=8 embed_dim=64 depth=4 num_heads=2')
    g.add_argument('--input_size', default=1024, type=int,
                   help='side of the square detection frame (ViTDet: 1024); images are scaled into it and padded')
    g.add_argument('--window_size', default=16, type=int,
                   help='side of the student\'s attention windows in patches; it must divide the patch grid '
                        '(1024 px / 16 = 64: 16); 0: global attention in every block')
    g.add_argument('--global_blocks', default=None, type=str, metavar='BLOCKS',
                   help='student blocks with global attention, e.g. 2,5,8,11 (default: 4 evenly spaced, ViTDet\'s)')
    g.add_argument('--fpn_channels', default=256, type=int,
                   help='channels of the feature pyramid and the detection heads (ViTDet: 256)')
    g.add_argument('--rois_per_image', default=512, type=int,
                   help='proposals sampled per image for the box and mask losses (ViTDet: 512)')
    g.add_argument('--score_thresh', default=0.05, type=float,
                   help='evaluation: detections scoring below this are dropped (ViTDet\'s 0.05)')
    g.add_argument('--drop_path', default=0.1, type=float, help='stochastic depth rate of the student backbone')
    g.add_argument('--nb_classes', default=None, type=int,
                   help='object categories (default: those of the training annotations; given, it must match them)')

    g = p.add_argument_group('attention transfer')
    g.add_argument('--mode', default='distill', choices=DETECTION_MODES,
                   help='none: the backbone trains alone (from scratch, or from --finetune: fine-tuning); copy / '
                        'distill and their q, k, v variants: the attention of the teacher (--finetune) is copied into '
                        'or distilled onto the student\'s blocks, restricted to each block\'s window')
    g.add_argument('--transfer_layers', default=None, type=str,
                   help='transferred student layers, e.g. 0-11 or 0,2,4 (default: all)')
    g.add_argument('--transfer_heads', default=None, type=str, metavar='N|HEADS',
                   help='heads of each transferred layer that are transferred (default: all)')
    g.add_argument('--transfer_loss', default='ce', choices=list(TRANSFER_LOSSES),
                   help='distill: the loss between the teacher\'s and the student\'s maps, as main_finetune.py\'s')
    g.add_argument('--atd_weight', default=1.0, type=float,
                   help='weight of the transfer loss beside the detection losses (modes with a transfer loss)')
    g.add_argument('--attention_impl', default='auto', choices=list(ATTENTION_IMPL_CHOICES),
                   help='fused: no N x N map at any block (q and k per window); explicit: maps in float32; auto: '
                        'fused on CUDA, explicit on CPU')

    g = p.add_argument_group('optimizer')
    g.add_argument('--weight_decay', default=0.1, type=float, help='AdamW weight decay (none on 1-D parameters)')
    add_lr_arguments(g, blr=4e-4)
    g.add_argument('--layer_decay', default=0.7, type=float,
                   help='layer-wise lr decay over the backbone\'s blocks (ViTDet\'s ViT-B: 0.7); the pyramid and '
                        'heads train at the full lr')
    g.add_argument('--min_lr', default=0.0, type=float, help='the lr the cosine schedule ends at')
    g.add_argument('--sched', default='step', choices=['cosine', 'step'],
                   help='step: the lr times --step_rate from each of --step_epochs on (ViTDet\'s); cosine: to --min_lr')
    g.add_argument('--step_epochs', default=[89, 97], type=int, nargs='+', metavar='EPOCH',
                   help='--sched step: epochs (from 1) from which the lr is multiplied by --step_rate')
    g.add_argument('--step_rate', default=0.1, type=float, help='--sched step: lr factor at each step epoch')
    g.add_argument('--warmup_epochs', default=0.14, type=float, metavar='N',
                   help='epochs of linear warmup (fractions allowed; ViTDet: 250 steps of 64 images, 0.14 of COCO\'s '
                        '118k training images)')
    g.add_argument('--clip_grad', default=None, type=float, metavar='NORM', help='clip the gradient norm')
    add_amp_argument(g)

    g = p.add_argument_group('data')
    g.add_argument('--data_path', default='', type=str,
                   help='a COCO root: train2017/ and val2017/ images, annotations/instances_{train,val}2017.json')
    g.add_argument('--train_ann', default=None, help='training annotations (default: under --data_path)')
    g.add_argument('--val_ann', default=None, help='evaluation annotations (default: under --data_path)')
    g.add_argument('--mean', default=None, type=float, nargs=3, help='normalisation mean (default: ImageNet\'s)')
    g.add_argument('--std', default=None, type=float, nargs=3, help='normalisation std (default: ImageNet\'s)')
    add_loader_arguments(g, jpeg_draft=False)

    g = p.add_argument_group('weights')
    g.add_argument('--finetune', default='',
                   help='pre-trained ViT checkpoint (e.g. mae_pretrain_vit_base.pth): the teacher in transfer modes, '
                        'the backbone\'s starting weights in mode none (empty: from scratch); the position embedding '
                        'is resampled to the detection grid')

    def after_resume(group) -> None:
        group.add_argument('--eval', action='store_true', help='evaluate the --resume checkpoint and stop')
        group.add_argument('--eval_every', default=10, type=int,
                           help='evaluate box and mask AP every N epochs (and after the last)')
        group.add_argument('--dist_eval', action='store_true',
                           help='split the evaluation images over the ranks (the AP is exact: the predictions are '
                                'gathered before COCO\'s evaluation); without it every rank evaluates them all')

    add_run_arguments(p, 'training', 'checkpoint of main_detection.py to resume from, or "allow": '
                      'output_dir/checkpoint.pth if it exists, else start fresh', after_resume)
    p.set_defaults(save_best=None, explicit_flags=None, command=None, ensemble_with='')
    add_tracking_arguments(p)
    add_distributed_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------
# Flags -> a resolved run
# ---------------------------------------------------------------------------------------------
def check_values(args) -> None:
    """Numeric and combined flags that no run can use, rejected before anything is loaded."""
    for flag in ('epochs', 'batch_size', 'accum_iter', 'print_freq', 'eval_every', 'fpn_channels', 'rois_per_image',
                 'input_size', 'blr'):
        check_positive(flag, getattr(args, flag))
    for flag in ('lr', 'clip_grad'):
        if getattr(args, flag) is not None:
            check_positive(flag, getattr(args, flag))
    for flag in ('weight_decay', 'atd_weight', 'warmup_epochs', 'min_lr'):
        if not math.isfinite(getattr(args, flag)) or getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag):g}: must be a finite number >= 0")
    check_range('step_rate', args.step_rate, 0, 1, low_open=True, meaning='the lr factor at each step epoch')
    if min(args.step_epochs) < 1:
        raise UserError(f"--step_epochs {' '.join(map(str, args.step_epochs))}: epochs count from 1")
    if args.window_size == 0 and args.global_blocks is not None:
        raise UserError(f"--global_blocks {args.global_blocks}: with --window_size 0 every block attends globally; "
                        "give a --window_size, or drop --global_blocks")
    check_range('layer_decay', args.layer_decay, 0, 1, low_open=True, meaning='the lr factor per block')
    check_range('drop_path', args.drop_path, 0, 1, high_open=True, meaning='the stochastic depth rate')
    check_range('score_thresh', args.score_thresh, 0, 1, high_open=True, meaning='the lowest score kept')
    if args.input_size % 32:
        raise UserError(f"--input_size {args.input_size}: must be a multiple of 32 (the detector pads its batches "
                        "to multiples of 32, the feature pyramid's coarsest stride); ViTDet's is 1024")
    if args.window_size < 0:
        raise UserError(f"--window_size {args.window_size}: must be >= 0 (0: global attention in every block)")
    transfer = WIRING[args.mode]
    check_mode_flags(args)
    if transfer is not None and not args.finetune and not args.eval:
        raise UserError(f"--mode {args.mode} needs a teacher: give --finetune CKPT (e.g. mae_pretrain_vit_base.pth)")
    if args.attention_impl == 'fused' and compares_maps(args.mode) and args.transfer_loss not in FUSED_TRANSFER_LOSSES:
        raise UserError(f"--transfer_loss {args.transfer_loss} with --attention_impl fused: it compares the maps "
                        "entry by entry, which the fused attention never builds; use --attention_impl explicit")
    if args.mean is not None or args.std is not None:
        check_normalization(args.mean, args.std)


def check_mode_flags(args) -> None:
    """The transfer flags a mode does nothing with are refused when the command gives them: every one in mode
    none; --atd_weight where no transfer loss trains (copy modes), --transfer_loss where no maps are compared by a
    loss (all but distill)."""
    given = set(args.explicit_flags or ()) | {f for f in ('transfer_layers', 'transfer_heads')
                                               if getattr(args, f) is not None}
    transfer = WIRING[args.mode]
    unused = {'transfer_layers': transfer is None, 'transfer_heads': transfer is None,
              'atd_weight': transfer is None or transfer.use != 'loss', 'transfer_loss': not compares_maps(args.mode)}
    for flag in sorted(f for f, does_nothing in unused.items() if does_nothing and f in given):
        raise UserError(f"--{flag}: --mode {args.mode} does nothing with it ("
                        + ("it transfers nothing" if transfer is None else
                           "it trains no transfer loss" if flag == 'atd_weight' else
                           "it compares no attention maps by a loss") + "); give --mode distill, or drop it")


def resolve_args(args, read_resume: bool = True) -> tuple[Config, dict | None, str | None]:
    """The flags checked and resolved into the run's read-only configuration before any heavy work; returns it
    with the checkpoint to resume and its path (none read without ``read_resume``: a SLURM submission)."""
    check_values(args)
    check_wandb(args.log_wandb)
    check_output_folders(args.output_dir, args.log_dir)
    impl = args.attention_impl
    if impl == 'auto':  # explicit maps where distill's map loss has no fused path
        impl = 'explicit' if compares_maps(args.mode) and args.transfer_loss not in FUSED_TRANSFER_LOSSES else \
            resolve_attention_impl('auto', args.device)
    cfg = Config.of(args, model_kwargs=parse_kwargs(args.model_kwargs, '--model_kwargs'),
                    log_dir=args.output_dir if args.log_dir is None else args.log_dir,
                    amp=args.amp or default_amp(args.device), num_workers=usable_workers(args.num_workers),
                    attention_impl=impl, mean=tuple(args.mean or IMAGENET_DEFAULT_MEAN),
                    std=tuple(args.std or IMAGENET_DEFAULT_STD), eval_data_path=args.data_path)
    for split in (('val2017',) if cfg.eval else ('train2017', 'val2017')):
        coco_paths(cfg.data_path, split, cfg.train_ann if split == 'train2017' else cfg.val_ann)
    if cfg.eval and not cfg.resume:
        raise UserError("--eval evaluates a detection checkpoint: give --resume CKPT (a checkpoint of "
                        "main_detection.py)")
    if not read_resume:
        check_model_flags(cfg)
        return cfg, None, None
    path = resume_path(requeued_checkpoint(cfg.output_dir, cfg.resume, cfg.eval) or cfg.resume, cfg.output_dir)
    if cfg.eval and not path:
        raise UserError(f"--eval --resume {cfg.resume}: no checkpoint to evaluate there")
    ckpt = load_training_checkpoint(path, to_train=not cfg.eval) if path else None
    if ckpt is not None:
        saved = recorded_args(ckpt)
        if saved.get('task') != 'detection':
            raise UserError(f"--resume {path!r} is not a checkpoint of main_detection.py: resume a detection run's "
                            "checkpoint, or start from pre-trained ViT weights with --finetune")
        if cfg.eval:  # the evaluated detector is the checkpoint's, unless the command says otherwise
            cfg = cfg.replace(**{flag: saved[flag] for flag in EVALUATED_FLAGS
                                 if flag in saved and flag not in (cfg.explicit_flags or ())})
    check_model_flags(cfg)
    if ckpt is not None:
        check_same_detector(saved, path, cfg)
        check_resume_matches(ckpt, path, cfg.finetune, teacher_from_finetune=WIRING[cfg.mode] is not None,
                             evaluating=cfg.eval)
        if holds_teacher(ckpt) and saved.get('finetune'):  # the teacher is the checkpoint's: so is its origin
            cfg = cfg.replace(finetune=saved['finetune'])
        if not cfg.eval:
            for line in changed_flags(saved, cfg.record()):
                log(f"resumed with a change: {line}")
    if not cfg.eval:
        check_inputs_not_overwritten(run_folder(cfg), {flag: getattr(cfg, flag, '') for flag in INPUT_FLAGS},
                                     next_position(ckpt)[0] if ckpt is not None else 0)
    check_run_folder(cfg.output_dir, cfg.resume, path, cfg.eval)
    return cfg, ckpt, path


def check_model_flags(cfg: Config) -> None:
    """The detector's flags build a detector (the window against the grid, the blocks and layers), before any
    folder is made and any weight exists."""
    with flag_errors(), torch.device('meta'):
        build_model(cfg, cfg.nb_classes or 1)


def compares_maps(mode: str) -> bool:
    """Whether ``mode`` pulls the student's attention maps towards the teacher's by a loss (--transfer_loss's)."""
    transfer = WIRING[mode]
    return transfer is not None and transfer.exposes == 'attn' and transfer.use == 'loss'


def block_set(spec) -> list[int] | None:
    """--global_blocks as the set of blocks it names (None: the default), for comparing two runs' values."""
    return None if spec is None else parse_indices(spec, 10 ** 6, 'blocks', 'global_blocks')


def check_same_detector(saved: dict, path: str, cfg: Config) -> None:
    """A resumed or evaluated checkpoint's detector is the one these flags build (``saved``: its record)."""
    for flag in ARCHITECTURE_FLAGS:
        value = getattr(cfg, flag)
        if flag == 'global_blocks' and flag in saved and block_set(saved[flag]) == block_set(value):
            continue
        if flag in saved and saved[flag] != value:
            raise UserError(f"--{flag} {value}: the run of {path} has --{flag} {saved[flag]}, and its detector has "
                            f"that shape: give --{flag} {saved[flag]}, or start a new run in another --output_dir")


def run_folder(cfg: Config) -> RunFolder:
    return RunFolder(cfg.output_dir, cfg.log_dir, cfg.save_every, evaluating=cfg.eval)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def build_model(cfg: Config, num_classes: int) -> TransferDetector:
    """The detector these flags describe (``num_classes`` object categories; random weights): the student ViT
    at the detection frame, with the teacher of transfer modes beside it."""
    arch = Architecture.of(cfg.model, cfg.model_kwargs, 'token')
    student = arch.create(0, cfg.input_size, cfg.drop_path)
    student.norm = torch.nn.Identity()  # ViTDet's pyramid reads the last block's tokens (its convolutions normalise)
    depth, patch = len(student.blocks), student.patch_embed.patch_size[0]
    grid = tuple(student.patch_embed.grid_size)
    global_blocks = (evenly_spaced_blocks(depth, min(4, depth)) if cfg.global_blocks is None else
                     parse_indices(cfg.global_blocks, depth, 'blocks', 'global_blocks'))
    if cfg.window_size and (grid[0] % cfg.window_size or grid[1] % cfg.window_size):
        raise UserError(f"--window_size {cfg.window_size}: does not tile the {grid[0]} x {grid[1]} patch grid "
                        f"(--input_size {cfg.input_size} / patch {patch}); give a divisor of {grid[0]}, or 0")
    teacher, pairs, layers, heads = None, None, (), None
    transfer = WIRING[cfg.mode]
    if transfer is not None:
        teacher = arch.create(0, cfg.input_size)
        init_class_token(student)
        pairs, layers = resolve_pairing(depth, len(teacher.blocks), cfg.transfer_layers)
        heads = parse_heads(cfg.transfer_heads, min(student.blocks[i].attn.num_heads for i in layers))
    trunk = DetectionTrunk(student, grid, cfg.window_size, global_blocks, teacher=teacher,
                           mode=transfer, pairs=pairs, layers=layers, heads=heads,
                           attention_impl=cfg.attention_impl, transfer_loss=cfg.transfer_loss)
    detector = ViTDetector(student, num_classes + 1, cfg.input_size, cfg.mean, cfg.std, cfg.fpn_channels,
                           cfg.rois_per_image, cfg.score_thresh)
    return TransferDetector(detector, trunk)


def load_initial_weights(model: TransferDetector, cfg: Config, resumed: bool) -> None:
    """--finetune: the teacher's weights in transfer modes (also when resuming, unless the checkpoint holds the
    teacher: copy modes), the backbone's starting weights in mode none (not when resuming: the checkpoint holds
    them). Evaluation needs the teacher of copy modes only, from the checkpoint."""
    teacher = model.teacher is not None
    if cfg.eval or (resumed and (not teacher or model.needs_teacher_at_eval)):
        return
    if not cfg.finetune:
        log("backbone: random initialisation (from scratch)")
        return
    report = load_pretrained_weights(model.teacher if teacher else model.student, cfg.finetune, flag='--finetune')
    log(f"{'teacher' if teacher else 'backbone'}: {report}")


def param_groups(model: TransferDetector, cfg: Config) -> list[dict]:
    """The backbone's parameters with layer-wise lr decay (MAE's count: blocks, then 1 for what follows), the
    pyramid and heads at the full lr; no weight decay on 1-D parameters."""
    backbone = param_groups_lrd(model.student, cfg.weight_decay, model.student.no_weight_decay(), cfg.layer_decay)
    heads = param_groups_weight_decay(model.detector.rcnn, cfg.weight_decay)
    return backbone + heads


class DetectionLoss:
    """The criterion of train_one_epoch: Mask R-CNN's losses summed, plus ``weight`` times the transfer loss;
    every term logged under its own name, the total as 'loss'."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, losses: dict, _targets) -> tuple[torch.Tensor, dict]:
        total = sum(v for k, v in losses.items() if k != 'loss_transfer')
        if 'loss_transfer' in losses:
            total = total + self.weight * losses['loss_transfer']
        return total, {'loss': total, **losses}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_detection(model: torch.nn.Module, loader, dataset, device: torch.device, amp_dtype, dist_eval: bool,
                       print_freq: int = 0) -> tuple[dict, list[dict]]:
    """Box and mask AP (%) of ``model`` on the evaluation set, from pycocotools' COCOeval, and the predictions as
    COCO results: every rank's shard gathered first under ``dist_eval``, so the numbers equal a single process's."""
    model.eval()
    results, seen, skipped = [], [], 0
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    for batch, (images, targets, batch_skipped) in enumerate(loader, start=1):
        skipped += batch_skipped
        if len(images) == 0:
            continue
        with autocast:
            outputs = model(images.to(device))
        outputs = [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
        results += to_coco_results(outputs, targets.list, dataset.categories)
        seen += [int(t['image_id']) for t in targets.list]
        if print_freq and batch % print_freq == 0:
            log(f"evaluation [{batch}/{len(loader)}]")
    if dist_eval:
        results, seen = gather_results(results), gather_image_ids(seen)
        skipped = int(all_reduce_sum(torch.tensor([float(skipped)], device=device)).item())
    stats = coco_evaluate(results, dataset.coco, sorted(set(seen)))
    # the images the AP is over (undecodable ones are left out of it, and counted)
    return {**stats, 'images': len(set(seen)), 'skipped_images': skipped}, results


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    args = Config.of(args, **init_distributed_mode(args))
    with Console():
        cfg, ckpt, ckpt_path = resolve_args(args)
        if not cfg.eval and finished(ckpt, ckpt_path, cfg.epochs, cfg.output_dir):
            destroy()
            return {}
        with output_dir_in_use(run_folder(cfg), start_epoch(ckpt, 0)), \
                stop_on_signals(keeps_checkpoint=bool(cfg.output_dir) and not cfg.eval):
            run = Detection(cfg, ckpt, ckpt_path)
            stats = run.evaluate_only() if cfg.eval else run.fit()
    destroy()
    return stats


class Detection(EpochEnd):
    """The detection run: data, detector (and teacher), optimizer and training step, the checkpoint's components,
    each epoch's evaluation and log.txt line; the loop over epochs is util.run_loop's."""

    def __init__(self, cfg: Config, ckpt: dict | None, ckpt_path: str | None) -> None:
        self.cfg, self.ckpt, self.ckpt_path = cfg, ckpt, ckpt_path
        self.device = device = torch.device(cfg.device)
        seed_epoch(cfg.seed, 0, get_rank())
        val_images, val_ann = coco_paths(cfg.data_path, 'val2017', cfg.val_ann)
        self.val_set = build_coco_dataset(val_images, val_ann, cfg.input_size, train=False,
                                          flag_ann='--val_ann' if cfg.val_ann else '--data_path')
        self.train_set = None
        if not cfg.eval:
            train_images, train_ann = coco_paths(cfg.data_path, 'train2017', cfg.train_ann)
            self.train_set = build_coco_dataset(train_images, train_ann, cfg.input_size, train=True,
                                                nb_classes=cfg.nb_classes,
                                                flag_ann='--train_ann' if cfg.train_ann else '--data_path')
            if self.train_set.categories.ids != self.val_set.categories.ids:
                raise UserError(f"the categories of {train_ann} and {val_ann} differ: evaluate on annotations of the "
                                "training categories")
        categories = self.val_set.categories
        if cfg.nb_classes is not None and cfg.nb_classes != len(categories.ids):
            raise UserError(f"--nb_classes {cfg.nb_classes}: {val_ann} has {len(categories.ids)} categories; give "
                            f"--nb_classes {len(categories.ids)} or leave it out")
        self.num_classes = len(categories.ids)
        model = build_model(cfg, self.num_classes)
        load_initial_weights(model, cfg, resumed=ckpt is not None)
        self.model = model.to(device)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"detector: {Architecture.of(cfg.model, cfg.model_kwargs, 'token').label()} backbone, "
            f"{self.num_classes} categories, {cfg.input_size} px frame, {self.n_parameters / 1e6:.2f}M trainable "
            f"parameters; {model.trunk.describe()}; attention {cfg.attention_impl}, precision {cfg.amp}")
        world, rank = get_world_size(), get_rank()
        sampler = ShardSampler(self.val_set, world, rank) if cfg.dist_eval else range(len(self.val_set))
        self.val_loader = build_loader(self.val_set, sampler, cfg.batch_size, cfg.num_workers,
                                       pins_memory(cfg.pin_mem, cfg.device), train=False, collate=collate_detection)
        saved = recorded_args(ckpt).get('categories') if ckpt is not None else None
        if saved is not None and list(saved) != list(categories.ids):
            raise UserError(f"{val_ann}: its category ids {list(categories.ids)} are not those the detector of "
                            f"{ckpt_path} was trained on ({list(saved)}); give the annotations of its categories")
        self.record = {**cfg.record(), 'task': 'detection', 'categories': list(categories.ids)}
        if cfg.eval:
            return
        lr = learning_rate(cfg, world)
        schedule = Schedule.from_args(cfg, lr=lr)
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=(0.9, 0.999),
                                      fused=device.type == 'cuda')
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
        data = dataset_fingerprint(self.train_set)
        components = {'model': Weights(model.detector), 'optimizer': optimizer, 'scaler': scaler}
        if model.needs_teacher_at_eval:  # copy modes: the teacher is part of the model that is evaluated
            components['teacher'] = Weights(model.teacher, frozen=True)
        checkpointer = Checkpointer(cfg.output_dir, components, {**self.record, 'lr': lr, 'train_data': data},
                                    device, cfg.epochs, cfg.save_every)
        ddp_model = wrap_ddp(model, cfg.distributed, cfg.gpu, cfg.device)
        step = TrainingStep(ddp_model, DetectionLoss(cfg.atd_weight), optimizer, scaler, device, cfg.accum_iter,
                            cfg.clip_grad, self.amp_dtype, targets_to_model=True)
        self.loop = RunLoop(RunParts('training', cfg, step, self.train_set, data, schedule, checkpointer, ckpt,
                                     ckpt_path, flag_names(get_args_parser()), collate=collate_detection), self)

    def fit(self) -> dict:
        return self.loop.fit()

    def evaluate(self) -> tuple[dict, list[dict]]:
        stats, results = evaluate_detection(self.model, self.val_loader, self.val_set, self.device, self.amp_dtype,
                                            self.cfg.dist_eval, self.cfg.print_freq)
        skipped = (f" ({stats['skipped_images']} undecodable, left out)" if stats['skipped_images'] else '')
        log(f"box AP {stats['bbox_AP']:.2f}  mask AP {stats['segm_AP']:.2f} on {stats['images']} images{skipped}")
        return stats, results

    def evaluate_only(self) -> dict:
        """--eval --resume CKPT: the checkpoint's detector (and teacher) evaluated; eval_results.json, and the
        predictions as a COCO results file (coco_instances_results.json) that pycocotools reads."""
        load_exact(self.model.detector, self.ckpt['model'], f"checkpoint {self.ckpt_path!r} (model)")
        if self.model.needs_teacher_at_eval:
            load_exact(self.model.teacher, self.ckpt['teacher'], f"checkpoint {self.ckpt_path!r} (teacher)")
        stats, results = self.evaluate()
        stats = {f'test_{k}': v for k, v in stats.items()}
        write_eval_results(self.cfg, stats, self.ckpt_path, saved_position(self.ckpt))
        if self.cfg.output_dir and is_main_process():
            path = os.path.join(self.cfg.output_dir, PREDICTIONS)
            atomic_write_text(json.dumps(results), path)
            log(f"predictions written to {path}")
        return stats

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs

    def end(self, epoch: int, train_stats: dict, evaluate_now: bool, loop: RunLoop) -> dict:
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                 'n_parameters': self.n_parameters}
        if evaluate_now:
            test = {f'test_{k}': v for k, v in self.evaluate()[0].items()}
            loop.log_scalars('test', test, epoch)
            stats.update(test)
        write_log(self.cfg.output_dir, stats)
        loop.flush()
        return stats


def command_parser() -> Parser:
    return Parser('python main_detection.py', parents=[get_args_parser()], description=__doc__,
                  formatter_class=HelpFormatter)


def run(argv=None) -> dict:
    return run_command(command_parser(), 'main_detection.py', main, argv)


if __name__ == '__main__':
    run_cli(reporting_stop, run)  # a requested stop (SIGINT / SIGTERM) reported in one line
