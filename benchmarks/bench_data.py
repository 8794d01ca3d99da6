"""Data loading throughput beside the training step's: can the CPU feed the GPU?

Generates ImageNet-like JPEGs (default 500 x 375, quality 90) in a temporary folder and measures, with
the project's own transforms (util/datasets.py, MAE recipe: bicubic random-resized crop, flip,
RandAugment rand-m9-mstd0.5-inc1, random erasing; evaluation: bicubic resize and centre crop):

- images per second of one process (one thread, as a DataLoader worker runs), train and eval transforms;
- the training DataLoader's images per second with N workers (persistent, after one warm-up epoch);

each with full-resolution JPEG decoding and with reduced-scale decoding (``--no_jpeg_draft`` and the
default), interleaved in one run. The training step's images per second come from bench_step.py (run
here, in its own process, on --device, with main_finetune.py's default precision and attention path there)
or from --step_images_per_s (e.g. measured on the training GPU);
the table says which. "workers to feed" = step images/s / one process's images/s.

    python benchmarks/bench_data.py --workers 1 2
    python benchmarks/bench_data.py --workers 8 16 --step_images_per_s 900 --image_size 1024 768
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import bench_step  # noqa: E402
from main_finetune import get_args_parser  # noqa: E402
from models_attention import resolve_attention_impl  # noqa: E402
from util.datasets import build_dataset, build_loader, pins_memory  # noqa: E402
from util.precision import default_amp  # noqa: E402
from util.samplers import ResumableDistributedSampler  # noqa: E402

DECODES = {'full': False, 'draft': True}


def natural_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """JPEG bytes of a photo-like image: smooth colour regions, sharper structures and sensor-like noise."""
    def field(cells: int, channels: int, resample: int) -> np.ndarray:
        small = rng.integers(0, 256, (height // cells + 2, width // cells + 2, channels), dtype=np.uint8)
        big = Image.fromarray(small.squeeze(-1) if channels == 1 else small).resize((width, height), resample)
        return np.asarray(big, dtype=np.float32).reshape(height, width, channels)

    pixels = 0.6 * field(40, 3, Image.BICUBIC) + 0.4 * field(7, 1, Image.BILINEAR)
    pixels += rng.normal(0, 6, (height, width, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=quality)
    return buffer.getvalue()


def write_image_folder(root: str, images: int, width: int, height: int, classes: int = 2) -> None:
    """``root/{train,val}/class_<k>/<i>.jpg``, ``images`` per split."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for i in range(images):
            folder = os.path.join(root, split, f'class_{i % classes}')
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
                f.write(natural_jpeg(rng, width, height))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='DataLoader worker counts to measure')
    p.add_argument('--images', type=int, default=128, help='generated images per split')
    p.add_argument('--image_size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'),
                   help='size of the generated JPEGs (ImageNet-like: 500 375)')
    p.add_argument('--input_size', type=int, default=224, help='model input size (crop output)')
    p.add_argument('--batch_size', type=int, default=32, help='loader batch size')
    p.add_argument('--repeats', type=int, default=3, help='timed passes per measurement (median reported)')
    p.add_argument('--step_images_per_s', type=float, default=None,
                   help='the training step\'s images/s, measured elsewhere (skips running bench_step.py)')
    p.add_argument('--step_model', default='vit_tiny_patch16_224', help='the training step\'s model (pair)')
    p.add_argument('--step_mode', default='distill', choices=['none', 'copy', 'distill'],
                   help='the training step\'s mode (none: a plain student step)')
    p.add_argument('--step_batch_size', type=int, default=32, help='the training step\'s batch size')
    p.add_argument('--step_steps', type=int, default=3, help='timed training steps (median reported)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='where the training step runs (cuda or cpu), with the training script\'s default precision '
                        'and attention path there')
    return p.parse_args(argv)


def recipe_args(data: str, input_size: int, batch_size: int, jpeg_draft: bool, workers: int = 0):
    """main_finetune.py's arguments with their defaults (the MAE recipe) and ImageNet's normalisation."""
    return get_args_parser().parse_args(['--data_path', data, '--nb_classes', '2', '--input_size', str(input_size),
                                         '--batch_size', str(batch_size), '--num_workers', str(workers),
                                         '--device', 'cpu', '--mean', '0.485', '0.456', '0.406', '--std', '0.229',
                                         '0.224', '0.225'] + ([] if jpeg_draft else ['--no_jpeg_draft']))


def per_process_rate(dataset, repeats: int) -> list[float]:
    """Images per second of ``dataset[i]`` over the whole set, one thread, once per repeat."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return rates


class LoaderEpochs:
    """The training loader (persistent workers) of ``dataset``; ``rate()`` times one more epoch."""

    def __init__(self, dataset, args) -> None:
        self.sampler = ResumableDistributedSampler(dataset, 1, 0, shuffle=True, seed=0)
        self.loader = build_loader(dataset, self.sampler, args.batch_size, args.num_workers,
                                   pins_memory(args.pin_mem, args.device), train=True)
        self.epoch = 0

    def rate(self) -> float:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        start, n = time.perf_counter(), 0
        for images, _, _ in self.loader:
            n += len(images)
        return n / (time.perf_counter() - start)


def step_rate(args) -> tuple[float, str]:
    if args.step_images_per_s:
        return args.step_images_per_s, 'given with --step_images_per_s'
    task = 'plain' if args.step_mode == 'none' else args.step_mode
    # what main_finetune.py runs on this device: a plain student through timm's own (SDPA) attention
    impl = 'fused' if task == 'plain' else resolve_attention_impl('auto', args.device)
    spec = bench_step.StepSpec(model=args.step_model, kwargs=(), size=args.input_size, batch=args.step_batch_size,
                               task=task, path=impl,
                               device=args.device, amp=default_amp(args.device), end_layer=0, drop_path=0.1,
                               warmup=1, steps=args.step_steps)
    result = bench_step.run_measurement(bench_step.measure_step, spec, isolate=True)
    if not result.ok:
        raise RuntimeError(f'the training step could not be measured: {result.error}')
    source = (f'bench_step.py {args.step_model} {bench_step.TASK_NAMES[spec.task]}, batch {args.step_batch_size}, '
              f'{args.device}, amp {spec.amp}, {impl} attention')
    return args.step_batch_size / result.seconds, source


def main(args) -> list[tuple]:
    step, source = step_rate(args)
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []  # (what, decode, median images/s)
    with tempfile.TemporaryDirectory() as data:
        write_image_folder(data, args.images, *args.image_size)
        for split, train in (('train', True), ('eval', False)):
            datasets = {d: build_dataset(train, recipe_args(data, args.input_size, args.batch_size, draft))
                        for d, draft in DECODES.items()}
            rates = {d: [] for d in DECODES}
            for _ in range(args.repeats):  # interleaved, so that load on the machine affects both alike
                for d, dataset in datasets.items():
                    rates[d] += per_process_rate(dataset, 1)
            rows += [(f'{split} transform, 1 process', d, statistics.median(r)) for d, r in rates.items()]
        for workers in args.workers:
            loaders = {}
            for d, draft in DECODES.items():
                loader_args = recipe_args(data, args.input_size, args.batch_size, draft, workers)
                loaders[d] = LoaderEpochs(build_dataset(True, loader_args), loader_args)
                loaders[d].rate()  # warm-up: starts the workers
            rates = {d: [] for d in DECODES}
            for _ in range(args.repeats):  # interleaved, as above
                for d, loader in loaders.items():
                    rates[d].append(loader.rate())
            rows += [(f'train loader, {workers} worker{"s" * (workers > 1)}', d, statistics.median(r))
                     for d, r in rates.items()]
            del loaders
    w, h = args.image_size
    print(f"\n{args.images} generated JPEGs {w}x{h} (quality 90) -> {args.input_size}px, MAE recipe "
          f"(RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25), loader batch {args.batch_size}, "
          f"median of {args.repeats}; CPU threads available: {os.cpu_count()}\n")
    print("| pipeline | JPEG decode | images / s | draft / full | processes to feed the step |")
    print("| --- | --- | ---: | ---: | ---: |")
    full = {what: rate for what, d, rate in rows if d == 'full'}
    for what, d, rate in rows:
        ratio = f"{rate / full[what]:.2f}" if d == 'draft' else ''
        feed = f"{step / rate:.2f}" if what.endswith('1 process') else ''
        print(f"| {what} | {d} | {rate:.1f} | {ratio} | {feed} |")
    print(f"| training step ({source}) | | {step:.1f} | | |")
    return rows


if __name__ == '__main__':
    main(get_args())
