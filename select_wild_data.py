"""Attention Probe, step 1: score every image of an unlabelled "wild" set with a teacher and keep the
most useful ones for distilling that teacher's task (Wang et al., ICASSP 2022).

    python select_wild_data.py --teacher output_cifar10_teacher/checkpoint.pth \\
        --wild_path $IMAGENET/train --num_select 650000 --output selected/cifar10.pth
    torchrun --nproc_per_node 8 select_wild_data.py ...   # each rank scores its share of the chunks

Per image: the output score CE(logits, argmax logits) (low = confident), and at the probe blocks the
cosine similarity between the class token's attention over the patches and the uniform
distribution (low = focused). The paper's ranking: attnlier * (probe scores summed over blocks) +
outlier * output score, lowest kept (--score combined); --score output ranks as the released code
does, --score probe by attention alone, --random keeps a random subset of the same size.

Scores are written in chunks beside the output (<output>.chunks/); a rerun skips finished chunks,
so an interrupted run over 1.28M images continues where it stopped. The output file holds the
image paths, the selected indices, every score, the teacher's predictions, the soft-prediction sums
over the selection and the class-balance weights; main_finetune.py --mode probe --selection reads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from models_attention import forward_with_capture
from models_pairing import default_probe_blocks, parse_blocks
from models_spec import Architecture
from util.args import HelpFormatter, check_normalization, parse_kwargs
from util.config import Config
from util.datasets import collate_skipping_bad
from util.distributed import barrier, broadcast_object, destroy, get_rank, get_world_size, init_distributed_mode, log
from util.errors import UserError, run_cli
from util.model_record import classifier_of, flag_errors
from util.output import check_writable, save_atomic
from util.precision import default_amp
from util.pretrained import (
    is_named,
    load_pretrained_weights,
    local_checkpoint,
    read_checkpoint,
    require_classifier_head,
)
from util.selection import ImageFiles, list_images, selection_record, wild_transform, write_selection


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('python select_wild_data.py', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--teacher', required=True,
                   help='teacher checkpoint trained on the target task (main_finetune.py output, or any format '
                        'the teacher loader accepts), or a name: timm:NAME.tag, hf-hub:ORG/NAME (architecture, '
                        'classes and normalisation from its config) or an https:// URL')
    p.add_argument('--mean', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='input normalisation mean (default: the teacher\'s, as its checkpoint or hub config '
                        'records it, else ImageNet\'s)')
    p.add_argument('--std', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='input normalisation std (default: as --mean)')
    p.add_argument('--model', default=None,
                   help='teacher architecture (timm / MAE name); default: the one stored in the checkpoint')
    p.add_argument('--model_kwargs', default=[], nargs='*', metavar='KEY=VALUE',
                   help='timm architecture arguments of the teacher (default: from the checkpoint)')
    p.add_argument('--nb_classes', default=None, type=int, help='classes of the target task (default: checkpoint)')
    p.add_argument('--input_size', default=None, type=int, help='target task image size (default: checkpoint)')
    p.add_argument('--cls_token', action='store_true', help='the teacher classifies from the class token '
                   '(default: from the checkpoint; global average pooling otherwise)')
    p.add_argument('--use_teacher_ema', action='store_true', help='take the checkpoint\'s model_ema entry')
    p.add_argument('--wild_path', required=True,
                   help='the wild image set: an ImageFolder or any folder tree of images (labels are ignored)')
    p.add_argument('--output', required=True, help='selection file to write (.pth)')
    p.add_argument('--num_select', default=650000, type=int, help='number of images to keep')
    p.add_argument('--score', default='combined', choices=['combined', 'output', 'probe'],
                   help='ranking: the paper\'s combination, the output score alone (the released code\'s '
                        '--attnprobe_sel), or the attention probe alone')
    p.add_argument('--attnlier', default=0.05, type=float, help='weight of the attention-probe scores')
    p.add_argument('--outlier', default=0.9, type=float, help='weight of the output score')
    p.add_argument('--probe_blocks', default=None, type=str,
                   help='comma-separated teacher blocks to probe (default: those at 1/3 and 2/3 of the depth, '
                        'e.g. 3,7 of 12)')
    p.add_argument('--probe_heads', default='0', choices=['0', 'mean'],
                   help='probe head 0 (the reference) or average the score over all heads')
    p.add_argument('--random', action='store_true', help='baseline: keep a random subset of --num_select images')
    p.add_argument('--seed', default=0, type=int, help='seed of the --random baseline')
    p.add_argument('--chunk_size', default=50000, type=int, help='images per saved chunk of scores')
    p.add_argument('--batch_size', default=256, type=int, help='images per forward pass')
    p.add_argument('--num_workers', default=8, type=int, help='data loading processes per rank')
    p.add_argument('--print_freq', default=50, type=int, help='log progress every N batches')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--amp', default=None, choices=['bf16', 'none'],
                   help='autocast precision of the teacher (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--dist_url', default='env://', help='url used to set up distributed scoring')
    p.add_argument('--dist_timeout', default=120, type=int,
                   help='minutes a rank may wait for the others (scoring shards can be uneven)')
    return p


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def output_score(logits: torch.Tensor) -> torch.Tensor:
    """CE(logits, argmax logits) per image = logsumexp - max."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=1) - logits.max(dim=1).values


def probe_score(attn: torch.Tensor, num_prefix_tokens: int, heads: str = '0') -> torch.Tensor:
    """Cosine similarity between the class token's attention over the patches and the uniform
    distribution, for head 0 or averaged over heads. attn: (B, H, N, N) probabilities."""
    row = attn[:, :, 0, num_prefix_tokens:].float()
    cosine = row.sum(-1) / (row.norm(dim=-1) * math.sqrt(row.shape[-1]))
    return cosine[:, 0] if heads == '0' else cosine.mean(dim=1)


def ranking(output: torch.Tensor, probe: torch.Tensor, kind: str, attnlier: float, outlier: float) -> torch.Tensor:
    """The value to sort by (lowest kept). probe: (N, blocks)."""
    if kind == 'output':
        return output.clone()
    if kind == 'probe':
        return attnlier * probe.sum(dim=1)
    return attnlier * probe.sum(dim=1) + outlier * output


@torch.no_grad()
def score_chunk(teacher, dataset: ImageFiles, start: int, end: int, blocks: list[int], args, progress) -> dict:
    """Scores of images [start, end): output, probe per block, prediction, soft prediction, decodable."""
    n = end - start
    result = {'start': start, 'end': end, 'output': torch.full((n,), float('inf')),
              'probe': torch.full((n, len(blocks)), float('inf')), 'prediction': torch.full((n,), -1),
              'soft': torch.zeros(n, args.nb_classes, dtype=torch.float16), 'valid': torch.zeros(n, dtype=torch.bool)}
    subset = torch.utils.data.Subset(dataset, range(start, end))
    loader = DataLoader(subset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_skipping_bad, pin_memory=str(args.device).startswith('cuda'))
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16')
    for images, indices, skipped in loader:
        progress(len(indices) + skipped)
        if len(images) == 0:
            continue
        with autocast:
            logits, maps, _ = forward_with_capture(teacher, images.to(device, non_blocking=True),
                                                   attention_blocks=blocks)
        rows = indices - start
        result['output'][rows] = output_score(logits).cpu()
        result['probe'][rows] = torch.stack(
            [probe_score(maps[b], teacher.num_prefix_tokens, args.probe_heads) for b in blocks], dim=1).cpu()
        result['prediction'][rows] = logits.argmax(dim=1).cpu()
        result['soft'][rows] = F.softmax(logits.float(), dim=1).half().cpu()
        result['valid'][rows] = True
    return result


# how the warnings name a teacher's pooling
POOL_NAMES = {'avg': 'the average', 'map': 'attention pooling', 'max': 'the maximum', 'avgmax': 'average and maximum'}


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def resolve(args) -> tuple[Config, Any]:
    """The flags checked and resolved into the run's configuration, before any image is scored: precision,
    the distributed set-up, and the teacher classifier (util.model_record.classifier_of: architecture, classes,
    input size, pooling and normalisation from its checkpoint or name, each unless given here). Returns it with
    the teacher's checkpoint (read once)."""
    check_args(args)
    cfg = Config.of(args, amp=args.amp or default_amp(args.device))
    cfg = cfg.replace(**init_distributed_mode(cfg))
    checkpoint = read_checkpoint(cfg.teacher, flag='--teacher')
    recorded = classifier_of(cfg.teacher, checkpoint)
    if cfg.model is None and recorded is None:
        raise UserError(f"--teacher {cfg.teacher} does not record its architecture: give --model (and --model_kwargs)")
    nb_classes = cfg.nb_classes or (recorded.num_classes if recorded else None)
    if not nb_classes:
        raise UserError(f"--teacher {cfg.teacher} does not record its number of classes: give --nb_classes")
    pool = 'token' if cfg.cls_token else recorded.student.global_pool if recorded else 'avg'
    kwargs = {**(recorded.student.kwargs if recorded else {}), **parse_kwargs(cfg.model_kwargs, '--model_kwargs')}
    teacher = Architecture.of(cfg.model or recorded.student.name, kwargs, pool)
    return cfg.replace(mean=list(cfg.mean or (recorded.mean if recorded else IMAGENET_DEFAULT_MEAN)),
                       std=list(cfg.std or (recorded.std if recorded else IMAGENET_DEFAULT_STD)),
                       model=teacher.name, model_kwargs=dict(teacher.kwargs), nb_classes=nb_classes,
                       input_size=cfg.input_size or (recorded.img_size if recorded else 224),
                       teacher_pool=teacher.global_pool), checkpoint


def build_teacher(cfg: Config, checkpoint: Any):
    """The teacher classifier of the resolved configuration, its weights (head included) from ``checkpoint``."""
    if cfg.teacher_pool != 'token':
        pooling = POOL_NAMES.get(cfg.teacher_pool, f"{cfg.teacher_pool!r} pooling")
        warnings.warn(f"{cfg.teacher}: the teacher classifies from {pooling} of the tokens, not from the class "
                      "token, so the attention probe (the class token's attention) measures a token its head never "
                      "reads. Attention Probe's teachers classify from the class token: train the teacher with "
                      "--cls_token (or pass --cls_token here if this one does).", stacklevel=1)
    teacher = Architecture(cfg.model, cfg.model_kwargs, cfg.teacher_pool).create(cfg.nb_classes, cfg.input_size)
    report = load_pretrained_weights(teacher, cfg.teacher, use_ema=cfg.use_teacher_ema, checkpoint=checkpoint,
                                     flag='--teacher')
    require_classifier_head(report, '--teacher', cfg.teacher, cfg.nb_classes,
                            "selection needs the teacher trained on the target task")
    log(f"teacher {cfg.model} {cfg.model_kwargs}: {report}")
    return teacher.eval().requires_grad_(False)


def fingerprint(paths: list[str], args, blocks: list[int]) -> dict:
    """What the chunks depend on; a rerun with anything else must not reuse them."""
    digest = hashlib.sha256('\n'.join(paths).encode()).hexdigest()
    stat = os.stat(local_checkpoint(args.teacher, '--teacher'))
    return {'images': len(paths), 'paths_sha256': digest, 'teacher': args.teacher if is_named(args.teacher) else
            os.path.abspath(args.teacher), 'mean': args.mean, 'std': args.std,
            'teacher_size': stat.st_size, 'teacher_mtime': int(stat.st_mtime), 'model': args.model,
            'input_size': args.input_size, 'nb_classes': args.nb_classes, 'probe_blocks': blocks,
            'probe_heads': args.probe_heads, 'chunk_size': args.chunk_size, 'use_teacher_ema': args.use_teacher_ema}


def prepare_chunk_dir(chunk_dir: str, manifest: dict) -> None:
    os.makedirs(chunk_dir, exist_ok=True)
    path = os.path.join(chunk_dir, 'manifest.json')
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise UserError(f"{chunk_dir} holds scores of another run (different {', '.join(changed)}); "
                            "delete it to score afresh, or give another --output")
        return
    with open(path, 'w') as f:
        json.dump(manifest, f, indent=1)


def chunk_path(chunk_dir: str, k: int) -> str:
    return os.path.join(chunk_dir, f'chunk_{k:06d}.pth')


def merge(chunk_dir: str, n_chunks: int) -> dict:
    parts = [torch.load(chunk_path(chunk_dir, k), weights_only=True) for k in range(n_chunks)]
    return {key: torch.cat([p[key] for p in parts]) for key in ('output', 'probe', 'prediction', 'soft', 'valid')}


def select(scores: dict, args, blocks: list[int], paths: list[str]) -> dict:
    valid = scores['valid']
    n_valid = int(valid.sum())
    if args.num_select > n_valid:
        raise UserError(f"--num_select {args.num_select} exceeds the {n_valid} decodable wild images (of "
                        f"{len(paths)}; see the warnings above): lower --num_select")
    value = ranking(scores['output'], scores['probe'], args.score, args.attnlier, args.outlier)
    value[~valid] = float('inf')
    if args.random:
        generator = torch.Generator().manual_seed(args.seed)
        candidates = valid.nonzero().flatten()
        selected = candidates[torch.randperm(len(candidates), generator=generator)[:args.num_select]].sort().values
    else:
        selected = value.topk(args.num_select, largest=False).indices
    return selection_record(args.wild_path, paths, selected, 'random' if args.random else args.score, value,
                            scores['output'], {b: scores['probe'][:, i] for i, b in enumerate(blocks)},
                            scores['prediction'], valid, scores['soft'], args.nb_classes, args.input_size,
                            dict(vars(args)))


def check_num_select(num_select: int, n_images: int | None = None, wild_path: str = '') -> None:
    """Fail before scoring (hours on ImageNet) when the selection size cannot be met; ``n_images``:
    the size of the wild set, once listed."""
    if num_select <= 0:
        raise UserError(f"--num_select {num_select}: must be a positive number of images to keep")
    if n_images is not None and num_select > n_images:
        raise UserError(f"--num_select {num_select} exceeds the {n_images} images under --wild_path {wild_path!r}: "
                        "lower --num_select or give a larger wild set")


def check_args(args) -> None:
    """Flags that no selection can use, refused before the teacher is loaded and any image is scored."""
    check_num_select(args.num_select)
    for flag, meaning in (('chunk_size', 'images per saved chunk of scores'), ('batch_size', 'images per forward '
                          'pass'), ('print_freq', 'batches between progress lines')):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be >= 1 ({meaning})")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: must be >= 0 (0 loads images in the main process)")
    for flag in ('attnlier', 'outlier'):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag} {value:g}: must be a finite weight >= 0 (the ranking keeps the images with the "
                            "lowest attnlier x probe scores + outlier x output score; the paper's weights are 0.05 "
                            "and 0.9)")
    check_normalization(args.mean, args.std)
    check_output_file(args.output)


def check_output_file(output: str) -> None:
    """--output names a file in a folder this user can write (its scores go to <output>.chunks/ beside it)."""
    if output.endswith(('/', os.sep)) or os.path.isdir(output):
        raise UserError(f"--output {output!r} names a folder, but the selection is one file: give a file path, e.g. "
                        f"--output {os.path.join(output, 'selection.pth')}")
    chunks = output + '.chunks'
    if os.path.exists(chunks) and not os.path.isdir(chunks):
        raise UserError(f"--output {output!r}: {chunks!r} is a file, but the scores go to a folder of that name: "
                        "move that file, or give another --output")
    folder = os.path.dirname(os.path.abspath(output))
    check_writable(folder, f"--output {output!r}: its folder {folder!r}", "give an --output path in a folder "
                          "this user can create files in (the selection file and its scores, <output>.chunks/, go "
                          "there)")


def main(args) -> dict | None:
    args, checkpoint = resolve(args)
    rank, world = get_rank(), get_world_size()
    teacher = build_teacher(args, checkpoint).to(args.device)
    with flag_errors():
        blocks = parse_blocks(args.probe_blocks, len(teacher.blocks), default_probe_blocks(len(teacher.blocks))[:2])
    paths = broadcast_object(list_images(args.wild_path) if rank == 0 else None)
    check_num_select(args.num_select, len(paths), args.wild_path)
    chunk_dir = args.output + '.chunks'
    if rank == 0:
        prepare_chunk_dir(chunk_dir, fingerprint(paths, args, blocks))
    barrier()
    n_chunks = math.ceil(len(paths) / args.chunk_size)
    todo = [k for k in range(rank, n_chunks, world) if not os.path.exists(chunk_path(chunk_dir, k))]
    done_before = n_chunks - sum(1 for k in range(n_chunks) if not os.path.exists(chunk_path(chunk_dir, k)))
    log(f"{len(paths)} wild images in {n_chunks} chunks of {args.chunk_size}; {done_before} already scored; "
        f"probe blocks {blocks}, head {args.probe_heads}; {world} rank(s)")

    dataset = ImageFiles(args.wild_path, paths, wild_transform(args.input_size, train=False, mean=args.mean,
                                                               std=args.std))
    my_total = sum(min(args.chunk_size, len(paths) - k * args.chunk_size) for k in todo)
    state = {'seen': 0, 'batches': 0, 't0': time.time()}

    def progress(n: int) -> None:
        state['seen'] += n
        state['batches'] += 1
        if state['batches'] % args.print_freq == 0 or state['seen'] == my_total:
            rate = state['seen'] / max(time.time() - state['t0'], 1e-9)
            eta = (my_total - state['seen']) / max(rate, 1e-9)
            log(f"scored {state['seen']}/{my_total} images on rank {rank}  {rate:.1f} img/s  "
                f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")

    for k in todo:
        start, end = k * args.chunk_size, min((k + 1) * args.chunk_size, len(paths))
        result = score_chunk(teacher, dataset, start, end, blocks, args, progress)
        save_atomic(result, chunk_path(chunk_dir, k))
    barrier()
    selection = None
    if rank == 0:
        missing = [k for k in range(n_chunks) if not os.path.exists(chunk_path(chunk_dir, k))]
        if missing:
            raise RuntimeError(f"chunks {missing[:10]} were not scored; rerun to finish them")
        selection = select(merge(chunk_dir, n_chunks), args, blocks, paths)
        views = write_selection(selection, args.output)
        skipped = int((~selection['valid']).sum())
        log(f"kept {len(selection['selected'])} of {len(paths)} images ({selection['ranking']} ranking"
            + (f"; {skipped} undecodable skipped" if skipped else '') + f") -> {args.output}; the kept files and "
            f"their scores: {views[0]}; the best- and worst-ranked images: {views[1]}")
        log("class-balance weights: " + ' '.join(f"{w:.3f}" for w in selection['class_weights'].tolist()[:20])
            + (' ...' if args.nb_classes > 20 else ''))
    barrier()
    destroy()
    return selection


if __name__ == '__main__':
    run_cli(lambda: main(get_args_parser().parse_args()))
