"""MAE pre-training of a ViT on unlabelled images: the teacher "pre-trained on other data" for attention transfer.

    # MAE's ViT-L recipe (64 GPUs x 64 images); here 8 GPUs with --accum_iter 8 give the same effective batch
    torchrun --nproc_per_node 8 main_pretrain.py --model vit_large_patch16 --batch_size 64 --accum_iter 8 \\
        --data_path $IMAGENET --output_dir runs/mae_vit_large --resume allow
    # the encoder as a teacher
    python main_finetune.py --mode distill --model vit_large_patch16 --finetune runs/mae_vit_large/checkpoint.pth ...

Flow: arguments -> data (every image under --data_path/train, or --data_path; labels unused) -> masked
autoencoder (a timm ViT encoder, a light decoder) -> AdamW -> resume -> epochs of engine_finetune's
train_one_epoch (the reconstruction loss is the criterion) / checkpoint / log.txt and TensorBoard. Checkpoints
hold ``model`` in MAE's layout (the encoder's timm keys beside decoder_* and mask_token): main_finetune.py
takes them as --finetune.
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
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from engine_finetune import NonFiniteLossError, train_one_epoch
from models_dual_vit import create_vit, resolve_model_name
from models_mae import MaskedAutoencoder, is_mae_checkpoint, kept_tokens
from util.args import HelpFormatter, check_positive, check_range, parse_kwargs
from util.checkpoint import (
    check_finite,
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
from util.datasets import DataError, build_loader
from util.distributed import barrier, destroy, get_rank, get_world_size, init_distributed_mode, is_main_process, log
from util.errors import UserError, run_cli
from util.lr_sched import Schedule, lr_floor_warning
from util.output import (
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
    write_log,
)
from util.precision import AMP_DTYPES, default_amp
from util.run_control import Preempted, RunControl, stop_on_signals
from util.samplers import ResumableDistributedSampler, check_same_permutation, dataset_fingerprint
from util.selection import ImageFiles, list_images

DEFAULT_MODEL = 'vit_large_patch16'


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('MAE pre-training', add_help=False)
    p.add_argument('--batch_size', default=64, type=int,
                   help='batch size per GPU (effective batch size is batch_size * accum_iter * # gpus)')
    p.add_argument('--epochs', default=800, type=int, help='number of pre-training epochs (MAE\'s recipe: 800)')
    p.add_argument('--accum_iter', default=1, type=int,
                   help='accumulate gradients over this many iterations (a larger effective batch in less memory)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=DEFAULT_MODEL, type=str, metavar='MODEL',
                   help='architecture of the encoder: an MAE name (vit_large_patch16) or any timm ViT name; '
                        'fine-tune or distil from it with the same --model and --model_kwargs')
    g.add_argument('--model_kwargs', default={}, nargs='*', type=str, metavar='KEY=VALUE',
                   help='timm architecture arguments of the encoder, e.g. patch_size=4 embed_dim=192 depth=6 '
                        'num_heads=3')
    g.add_argument('--input_size', default=224, type=int, help='image input size')
    g.add_argument('--mask_ratio', default=0.75, type=float,
                   help='fraction of the patches removed from each image (the encoder sees the rest)')
    g.add_argument('--norm_pix_loss', action='store_true',
                   help='reconstruct each patch\'s pixels normalised by their mean and variance (MAE\'s recipe; '
                        'the default)')
    g.add_argument('--no_norm_pix_loss', action='store_false', dest='norm_pix_loss',
                   help='reconstruct the (input-normalised) pixels themselves')
    p.set_defaults(norm_pix_loss=True)
    g.add_argument('--decoder_embed_dim', default=512, type=int, help='width of the decoder')
    g.add_argument('--decoder_depth', default=8, type=int, help='number of decoder blocks')
    g.add_argument('--decoder_num_heads', default=16, type=int, help='attention heads of the decoder blocks')

    g = p.add_argument_group('optimizer')
    g.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (none on 1-D parameters)')
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (absolute lr; default: --blr x effective batch size / 256)')
    g.add_argument('--blr', type=float, default=1.5e-4, metavar='LR',
                   help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    g.add_argument('--min_lr', type=float, default=0.0, metavar='LR', help='the lr the cosine decay ends at')
    g.add_argument('--warmup_epochs', type=int, default=40, metavar='N', help='epochs to warm up the lr')
    g.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
    g.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='mixed precision: bf16 (default on CUDA, no loss scaling), fp16 (with a grad scaler), '
                        'none (default on CPU)')

    g = p.add_argument_group('data')
    g.add_argument('--data_path', default='', type=str,
                   help='images to pre-train on: every image under data_path/train when that folder exists (an '
                        'ImageNet-style root), else under data_path; any folder layout, class folders are ignored')
    g.add_argument('--min_crop_scale', type=float, default=0.2,
                   help='smallest area fraction of the random-resized crop')
    g.add_argument('--num_workers', default=10, type=int,
                   help='data loading processes per GPU; they persist across epochs and are re-seeded per epoch')
    g.add_argument('--pin_mem', action='store_true',
                   help='pin CPU memory in the DataLoader for more efficient transfer to GPU (default)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin CPU memory')
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='./output_dir', help='where to save checkpoints and log.txt; empty: none')
    g.add_argument('--log_dir', default=None, help='where to write TensorBoard events (default: --output_dir)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='device to use for training (default: cuda when available)')
    g.add_argument('--seed', default=0, type=int, help='random seed')
    g.add_argument('--resume', default='',
                   help='checkpoint of main_pretrain.py to resume from, or "allow": output_dir/checkpoint.pth if it '
                        'exists, else start fresh')
    g.add_argument('--save_every', default=20, type=int,
                   help='also keep checkpoint-<epoch>.pth every N epochs and at the end (0: only checkpoint.pth)')
    g.add_argument('--print_freq', default=20, type=int,
                   help='print and log the loss every N steps; mid-epoch checkpoints and preemption stops '
                        'happen at these steps too')
    g.add_argument('--checkpoint_minutes', default=10, type=float,
                   help='also write checkpoint.pth inside an epoch every N minutes (0: only at epoch ends), so a '
                        'preempted or crashed job loses at most that much training')
    # read by util.output, which serves main_finetune.py too: pre-training never evaluates nor keeps a best
    p.set_defaults(eval=False, save_best=None)

    g = p.add_argument_group('distributed')
    g.add_argument('--world_size', default=1, type=int, help='number of distributed processes (set by torchrun)')
    g.add_argument('--local_rank', default=-1, type=int, help='ignored; torchrun passes LOCAL_RANK')
    g.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    g.add_argument('--dist_timeout', default=30, type=int,
                   help='minutes a collective may wait before the job fails (a hung rank ends the job)')
    return p


# ---------------------------------------------------------------------------------------------
# Flags -> a resolved run
# ---------------------------------------------------------------------------------------------
def check_values(args) -> None:
    """Numeric flags that no run can use, rejected before anything is loaded."""
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: must be >= 1")
    if args.batch_size < 1 or args.accum_iter < 1 or args.print_freq < 1:
        raise UserError("--batch_size, --accum_iter and --print_freq must be >= 1")
    check_range('mask_ratio', args.mask_ratio, 0, 1, low_open=True, high_open=True,
                meaning='the fraction of patches removed; the encoder sees the rest')
    check_range('min_crop_scale', args.min_crop_scale, 0, 1, low_open=True,
                meaning='the smallest area fraction of the random-resized crop')
    for flag in ('decoder_embed_dim', 'decoder_depth', 'decoder_num_heads'):
        check_positive(flag, getattr(args, flag))
    if args.decoder_embed_dim % args.decoder_num_heads or args.decoder_embed_dim % 4:
        raise UserError(f"--decoder_embed_dim {args.decoder_embed_dim}: must be a multiple of --decoder_num_heads "
                        f"({args.decoder_num_heads}) and of 4 (its sin-cos position embedding)")


def data_root(data_path: str) -> str:
    """The folder whose images are pre-trained on: data_path/train when it exists, else data_path."""
    if not data_path:
        raise UserError("give --data_path: a folder of images (any layout), or a data set root holding train/")
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path {data_path!r} is not a folder: give a folder of images (any layout), or a "
                        "data set root holding train/")
    train = os.path.join(data_path, 'train')
    return train if os.path.isdir(train) else data_path


def resolve_args(args) -> tuple[dict | None, str | None]:
    """Fill derived defaults and check the flags before any heavy work; returns (checkpoint to resume, its path)."""
    check_values(args)
    check_output_folders(args)
    args.model_kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    resolve_model_name(args.model)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.amp is None:
        args.amp = default_amp(args.device)
    data_root(args.data_path)
    path = resume_path(args.resume, args.output_dir)
    ckpt = load_training_checkpoint(path) if path else None
    if ckpt is not None and not is_mae_checkpoint(ckpt['model']):
        raise UserError(f"--resume {path!r} is not a checkpoint of main_pretrain.py (its model has no MAE decoder): "
                        "continue it with main_finetune.py, or start pre-training in another --output_dir")
    check_inputs_not_overwritten(args, next_position(ckpt)[0] if ckpt is not None else 0)
    check_run_folder(args, path)
    return ckpt, path


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------
def build_pretraining_set(args) -> ImageFiles:
    """MAE's augmentation of every image under the data root: a bicubic random-resized crop, a horizontal flip,
    ImageNet's normalisation. Items are (image, index): the index stands where a label would."""
    root = data_root(args.data_path)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.input_size, scale=(args.min_crop_scale, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    dataset = ImageFiles(root, list_images(root), transform)
    log(f"pre-training on {len(dataset)} images under {root}")
    return dataset


def build_model(args) -> MaskedAutoencoder:
    encoder = create_vit(args.model, num_classes=0, global_pool='token', img_size=args.input_size,
                         **args.model_kwargs)
    model = MaskedAutoencoder(encoder, args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads,
                              mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss)
    keep = kept_tokens(model.num_patches, args.mask_ratio)
    if not 0 < keep < model.num_patches:
        raise UserError(f"--mask_ratio {args.mask_ratio}: of the {model.num_patches} patches the encoder would see "
                        f"{keep}; it needs at least one, and one must be removed")
    return model


def reconstruction_loss(outputs: tuple, _indices: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """train_one_epoch's criterion: the model's forward has computed the loss already."""
    return outputs[0], {'loss': outputs[0]}


# ---------------------------------------------------------------------------------------------
# Checkpoints: the project's checkpoint format and functions (util.checkpoint), with the masked autoencoder in
# the place of a student and no teacher, EMA or criterion state
# ---------------------------------------------------------------------------------------------
class SavedModel:
    """What util.checkpoint saves and restores of a run's model: ``student`` (the checkpoint's 'model'), here
    the masked autoencoder in MAE's layout; there is no teacher."""
    teacher = None
    needs_teacher_at_eval = False

    def __init__(self, model: MaskedAutoencoder) -> None:
        self.student = model


def pretraining_state(model: MaskedAutoencoder, optimizer, scaler, record: dict, epoch: int, step: int | None,
                      partial: dict | None = None, epoch_stats: dict | None = None) -> dict:
    return checkpoint_state(SavedModel(model), None, optimizer, scaler, None, None, record, epoch, step, {},
                            partial, epoch_stats)


def restore_pretraining_state(ckpt: dict, ckpt_path: str, model: MaskedAutoencoder, optimizer, scaler, args,
                              steps_per_epoch: int, data: dict) -> tuple[int, int, dict | None, dict | None]:
    """Weights, optimizer and position from a checkpoint; returns (epoch, step, this rank's generator states to
    continue the epoch with, the epoch's loss sums so far), as main_finetune.py restores a training run."""
    restore_weights(ckpt, ckpt_path, SavedModel(model), None)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    world = get_world_size()
    epoch, step = resume_step(ckpt, ckpt_path, args.batch_size, world, steps_per_epoch)
    rng, partial = None, None
    if step:
        rng, partial = resume_rng(ckpt, get_rank(), world, args.batch_size), ckpt.get('partial_epoch')
        check_same_permutation(ckpt, ckpt_path, args.seed, data, epoch)
    log(f"resumed from {ckpt_path}: epoch {epoch}, step {step}"
        + (f" of {steps_per_epoch} ({samples_done(ckpt)} samples of the epoch done)" if step else ''))
    return epoch, step, rng, partial


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    init_distributed_mode(args)
    ckpt, ckpt_path = resolve_args(args)
    if finished(ckpt, ckpt_path, args.epochs, args.output_dir):
        destroy()
        return {}
    with output_dir_in_use(args), stop_on_signals():
        return pretrain(args, ckpt, ckpt_path)


def pretrain(args, ckpt: dict | None, ckpt_path: str | None) -> dict:
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()
    log(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    log(json.dumps(vars(args), indent=1, default=str))
    torch.backends.cudnn.benchmark = True
    seed_epoch(args.seed, 0, rank)

    model = build_model(args).to(device)  # first: it checks --mask_ratio against the patches
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"masked autoencoder: encoder {model.encoder.default_cfg.get('architecture')} {args.model_kwargs}, decoder "
        f"{args.decoder_depth} x {args.decoder_embed_dim}, {n_parameters / 1e6:.2f}M trainable parameters; the "
        f"encoder sees {kept_tokens(model.num_patches, args.mask_ratio)} of {model.num_patches} patches")

    dataset = build_pretraining_set(args)
    sampler = ResumableDistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
    loader = build_loader(dataset, sampler, args, train=True)
    steps_per_epoch = sampler.num_samples // args.batch_size  # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} images on {world} processes make no full batch of {args.batch_size}; "
                        "lower --batch_size")

    eff_batch_size = args.batch_size * args.accum_iter * world
    lr = args.lr if args.lr is not None else args.blr * eff_batch_size / 256
    log(f"base lr: {lr * 256 / eff_batch_size:.2e}  actual lr: {lr:.2e}  "
        f"accumulate grad iterations: {args.accum_iter}  effective batch size: {eff_batch_size}")
    if args.min_lr > lr and is_main_process():
        print(lr_floor_warning(lr, args.min_lr, eff_batch_size, args.accum_iter), file=sys.stderr, flush=True)
    schedule = Schedule.from_args(args, lr=lr)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=lr, betas=(0.9, 0.95),
                                  fused=device.type == 'cuda')
    data = dataset_fingerprint(dataset)
    record = {**vars(args), 'lr': lr, 'train_data': data}  # the flags and the values resolved from them
    if is_main_process() and args.output_dir:
        warn_if_little_space(args.output_dir, checkpoint_bytes([model], optimizer), bool(args.save_every))

    start_epoch, start_step, start_rng, partial, last_good = 0, 0, None, None, None
    if ckpt is not None:
        start_epoch, start_step, start_rng, partial = restore_pretraining_state(
            ckpt, ckpt_path, model, optimizer, scaler, args, steps_per_epoch, data)
        last_good = describe_checkpoint(ckpt_path, ckpt['epoch'], ckpt.get('step'))
        trim_log(args.output_dir, start_epoch)
    ddp_model = model
    if args.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    log_writer = open_log_writer(args, int((start_epoch + start_step / steps_per_epoch) * 1000))

    def save(epoch: int, step: int | None, partial: dict | None = None, extra_names: tuple[str, ...] = (),
             epoch_stats: dict | None = None) -> None:
        """``extra_names`` and then checkpoint.pth on rank 0, unless any rank's state holds NaN or inf."""
        nonlocal last_good
        if not args.output_dir:
            return
        state = pretraining_state(model, optimizer, scaler, record, epoch, step, partial, epoch_stats)
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        check_finite(state, describe_checkpoint(path, epoch, step), last_good, device)
        if is_main_process():
            for name in extra_names:
                save_atomic(state, os.path.join(args.output_dir, name))
            save_atomic(state, path)
        barrier()
        last_good = describe_checkpoint(path, epoch, step)

    def numbered(epoch: int) -> tuple[str, ...]:
        keep = args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs)
        return (f'checkpoint-{epoch}.pth',) if keep else ()

    def end_epoch(epoch: int, train_stats: dict) -> dict:
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, 'n_parameters': n_parameters}
        write_log(args, stats)
        if log_writer is not None:
            log_writer.flush()
        return stats

    stats = {}
    if epoch_end_missing(ckpt, ckpt_path, args.output_dir):
        log(f"finishing epoch {ckpt['epoch']} of {ckpt_path}: its log.txt line was not written")
        stats = end_epoch(ckpt['epoch'], ckpt['epoch_stats'])
    control = RunControl(args.checkpoint_minutes, save)
    log(f"start pre-training for {args.epochs} epochs ({steps_per_epoch} steps each) from epoch {start_epoch}"
        + (f", step {start_step}" if start_step else ''))
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank, loader.generator)
        first_step = start_step if epoch == start_epoch else 0
        if first_step and start_rng is not None:
            set_rng_state(start_rng)
        sampler.set_epoch(epoch, start_index=first_step * args.batch_size)
        try:
            train_stats = train_one_epoch(
                ddp_model, reconstruction_loss, loader, optimizer, device, epoch, scaler, args, schedule,
                amp_dtype=amp_dtype, log_writer=log_writer, partial=partial if first_step else None,
                start_step=first_step, steps_per_epoch=steps_per_epoch, control=control)
        except NonFiniteLossError as e:
            e.args = (f"{e} Training stopped; " + last_good_sentence(last_good),)
            raise
        try:
            save(epoch, None, extra_names=numbered(epoch), epoch_stats=train_stats)
        except UserError:  # e.g. a full disk: the epoch's line still goes into log.txt (it is trained again)
            with contextlib.suppress(OSError):
                write_log(args, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
            raise
        stats = end_epoch(epoch, train_stats)
        if epoch + 1 < args.epochs:
            control.stop_after_epoch()

    log(f"pre-training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    destroy()
    return stats


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser('python main_pretrain.py', parents=[get_args_parser()],
                                     description=__doc__, formatter_class=HelpFormatter)
    return main(parser.parse_args(argv))


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
