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
import os

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from engine_finetune import TrainingStep
from models_mae import MaskedAutoencoder, is_mae_checkpoint, kept_tokens
from models_spec import Architecture, ModelSpec
from models_vit import create_vit, resolve_model_name
from util.args import (
    HelpFormatter,
    Parser,
    add_amp_argument,
    add_distributed_arguments,
    add_loader_arguments,
    add_lr_arguments,
    add_run_arguments,
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
    load_training_checkpoint,
    next_position,
    recorded_args,
    seed_epoch,
    start_epoch,
    student_weights,
)
from util.config import Config
from util.datasets import DataError, cache_decoded
from util.distributed import destroy, get_rank, get_world_size, init_distributed_mode, log
from util.errors import UserError, run_cli
from util.lr_sched import Schedule, learning_rate
from util.model_record import changed_flags, flag_errors
from util.output import (
    INPUT_FLAGS,
    RunFolder,
    check_inputs_not_overwritten,
    check_output_folders,
    output_dir_in_use,
    resume_path,
    write_log,
)
from util.precision import AMP_DTYPES, default_amp
from util.run_control import reporting_stop, stop_on_signals
from util.run_loop import EpochEnd, RunLoop, RunParts, check_run_folder, finished
from util.run_record import Console
from util.samplers import dataset_fingerprint
from util.selection import ImageFiles, list_images
from util.tracking import add_tracking_arguments, check_wandb

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
    add_lr_arguments(g, blr=1.5e-4)
    g.add_argument('--min_lr', type=float, default=0.0, metavar='LR', help='the lr the cosine decay ends at')
    g.add_argument('--warmup_epochs', type=int, default=40, metavar='N', help='epochs to warm up the lr')
    g.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
    add_amp_argument(g)

    g = p.add_argument_group('data')
    g.add_argument('--data_path', default='', type=str,
                   help='images to pre-train on: every image under data_path/train when that folder exists (an '
                        'ImageNet-style root), else under data_path; any folder layout, class folders are ignored')
    g.add_argument('--min_crop_scale', type=float, default=0.2,
                   help='smallest area fraction of the random-resized crop')
    add_loader_arguments(g, jpeg_draft=False)
    add_run_arguments(p, 'training', 'checkpoint of main_pretrain.py to resume from, or "allow": '
                      'output_dir/checkpoint.pth if it exists, else start fresh')
    # read by util.output, which serves main_finetune.py too: pre-training never evaluates nor keeps a best
    p.set_defaults(eval=False, save_best=None, explicit_flags=None, command=None)
    add_tracking_arguments(p)
    add_distributed_arguments(p)
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


# The flags that make the autoencoder: a resumed run keeps them (its weights and optimizer state have their shapes).
ARCHITECTURE_FLAGS = ('model', 'model_kwargs', 'input_size', 'decoder_embed_dim', 'decoder_depth', 'decoder_num_heads')


def check_same_autoencoder(saved: dict, cfg: Config, path: str) -> None:
    """A resumed pre-training run builds the autoencoder its checkpoint holds."""
    for flag in ARCHITECTURE_FLAGS:
        if flag in saved and saved[flag] != getattr(cfg, flag):
            raise UserError(f"--{flag} {getattr(cfg, flag)}: the pre-training run of {path} has --{flag} "
                            f"{saved[flag]}, and its weights have that shape: give --{flag} {saved[flag]} to "
                            "continue it, or start a new run in another --output_dir")


def data_root(data_path: str) -> str:
    """The folder whose images are pre-trained on: data_path/train when it exists, else data_path."""
    if not data_path:
        raise UserError("give --data_path: a folder of images (any layout), or a data set root holding train/")
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path {data_path!r} is not a folder: give a folder of images (any layout), or a "
                        "data set root holding train/")
    train = os.path.join(data_path, 'train')
    return train if os.path.isdir(train) else data_path


def resolve_args(args) -> tuple[Config, dict | None, str | None]:
    """The flags checked and resolved into the run's read-only configuration before any heavy work; returns it
    with the checkpoint to resume and its path."""
    check_values(args)
    check_wandb(args.log_wandb)
    check_output_folders(args.output_dir, args.log_dir)
    cfg = Config.of(args, model_kwargs=parse_kwargs(args.model_kwargs, '--model_kwargs'),
                    log_dir=args.output_dir if args.log_dir is None else args.log_dir,
                    amp=args.amp or default_amp(args.device), num_workers=usable_workers(args.num_workers))
    with flag_errors(), torch.device('meta'):
        resolve_model_name(cfg.model)
        build_model(cfg)  # the input size against the patches, the mask ratio: before any folder is made
    data_root(cfg.data_path)
    path = resume_path(cfg.resume, cfg.output_dir)
    ckpt = load_training_checkpoint(path) if path else None
    if ckpt is not None and not is_mae_checkpoint(student_weights(ckpt)):
        raise UserError(f"--resume {path!r} is not a checkpoint of main_pretrain.py (its model has no MAE decoder): "
                        "continue it with main_finetune.py, or start pre-training in another --output_dir")
    if ckpt is not None:
        check_same_autoencoder(recorded_args(ckpt), cfg, path)
        for line in changed_flags(recorded_args(ckpt), cfg.record()):
            log(f"resumed with a change: {line}")
    check_inputs_not_overwritten(run_folder(cfg), {flag: getattr(cfg, flag, '') for flag in INPUT_FLAGS},
                                 next_position(ckpt)[0] if ckpt is not None else 0)
    check_run_folder(cfg.output_dir, cfg.resume, path)
    return cfg, ckpt, path


def run_folder(cfg: Config) -> RunFolder:
    """Where the pre-training run writes (numbered checkpoints every --save_every epochs; no checkpoint-best.pth)."""
    return RunFolder(cfg.output_dir, cfg.log_dir, cfg.save_every)


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
    if args.cache_images:
        cache_decoded(dataset)
    log(f"pre-training on {len(dataset)} images under {root}")
    return dataset


def build_model(args) -> MaskedAutoencoder:
    with flag_errors():
        encoder = create_vit(args.model, num_classes=0, global_pool='token', img_size=args.input_size,
                             **args.model_kwargs)
        model = MaskedAutoencoder(encoder, args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads,
                                  mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss)
    keep = kept_tokens(model.num_patches, args.mask_ratio)
    if not 0 < keep < model.num_patches:
        raise UserError(f"--mask_ratio {args.mask_ratio}: of the {model.num_patches} patches the encoder would see "
                        f"{keep}; it needs at least one, and one must be removed")
    return model


def encoder_spec(cfg: Config) -> ModelSpec:
    """The encoder as a plain model's description (util.model_record.classifier_of reads it back)."""
    return ModelSpec(mode='none', student=Architecture.of(cfg.model, cfg.model_kwargs, 'token'), num_classes=0,
                     img_size=cfg.input_size, mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))


def reconstruction_loss(outputs: tuple, _indices: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """train_one_epoch's criterion: the model's forward has computed the loss already."""
    return outputs[0], {'loss': outputs[0]}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    args = Config.of(args, **init_distributed_mode(args))
    with Console():  # rank 0's console, kept in the run folder once the run begins
        cfg, ckpt, ckpt_path = resolve_args(args)
        if finished(ckpt, ckpt_path, cfg.epochs, cfg.output_dir):
            destroy()
            return {}
        with output_dir_in_use(run_folder(cfg), start_epoch(ckpt, 0)), \
                stop_on_signals(keeps_checkpoint=bool(cfg.output_dir)):
            stats = Pretraining(cfg, ckpt, ckpt_path).fit()
    destroy()
    return stats


class Pretraining(EpochEnd):
    """The pre-training run: the masked autoencoder, its optimizer and training step, the components its
    checkpoints hold, and each epoch's log.txt line; the loop over epochs is util.run_loop's (``fit``)."""

    def __init__(self, cfg: Config, ckpt: dict | None, ckpt_path: str | None) -> None:
        self.cfg, device = cfg, torch.device(cfg.device)
        torch.backends.cudnn.benchmark = True
        seed_epoch(cfg.seed, 0, get_rank())
        model = build_model(cfg).to(device)  # first: it checks --mask_ratio against the patches
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"masked autoencoder: encoder {model.encoder.default_cfg.get('architecture')} {cfg.model_kwargs}, "
            f"decoder {cfg.decoder_depth} x {cfg.decoder_embed_dim}, {self.n_parameters / 1e6:.2f}M trainable "
            f"parameters; the encoder sees {kept_tokens(model.num_patches, cfg.mask_ratio)} of {model.num_patches} "
            "patches")
        dataset = build_pretraining_set(cfg)
        lr = learning_rate(cfg, get_world_size())
        schedule = Schedule.from_args(cfg, lr=lr)
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95),
                                      fused=device.type == 'cuda')
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
        data = dataset_fingerprint(dataset)
        # the configuration and the values resolved from it, with the encoder's description: a checkpoint given to
        # main_finetune.py as --finetune without --model names its architecture
        record = {**cfg.record(), 'lr': lr, 'train_data': data, 'model_spec': encoder_spec(cfg).to_record()}
        # the autoencoder in MAE's layout is the checkpoint's 'model': main_finetune.py reads it as --finetune
        checkpointer = Checkpointer(cfg.output_dir, {'model': Weights(model), 'optimizer': optimizer,
                                                     'scaler': scaler}, record, device, cfg.epochs, cfg.save_every)
        ddp_model = model if not cfg.distributed else DistributedDataParallel(
            model, device_ids=[cfg.gpu] if device.type == 'cuda' else None)
        step = TrainingStep(ddp_model, reconstruction_loss, optimizer, scaler, device, cfg.accum_iter, cfg.clip_grad,
                            AMP_DTYPES[cfg.amp])
        self.loop = RunLoop(RunParts('pre-training', cfg, step, dataset, data, schedule, checkpointer, ckpt,
                                     ckpt_path, flag_names(get_args_parser())), self)

    def fit(self) -> dict:
        return self.loop.fit()

    def end(self, epoch: int, train_stats: dict, evaluate_now: bool, loop: RunLoop) -> dict:
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                 'n_parameters': self.n_parameters}
        write_log(self.cfg.output_dir, stats)
        loop.flush()
        return stats


def run(argv=None) -> dict:
    parser = Parser('python main_pretrain.py', parents=[get_args_parser()], description=__doc__,
                    formatter_class=HelpFormatter)
    return run_command(parser, 'main_pretrain.py', main, argv)


if __name__ == '__main__':
    run_cli(reporting_stop, run)  # a requested stop (SIGINT / SIGTERM) reported in one line
