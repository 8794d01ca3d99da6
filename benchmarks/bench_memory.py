"""Peak memory and time of one training step over input sizes, explicit vs fused attention.

For each input size: the teacher's forward alone, a plain student step (mode none), and copy and
distill steps with ``--attention_impl explicit`` (N x N maps) and ``fused`` (SDPA and the chunked
distillation loss). Each measurement runs in its own child process (benchmarks/bench_step.py), so
its peak memory is its own: on CPU the process's peak resident set size, which includes the Python
interpreter, torch and the weights; "step" is that peak minus the peak before the first step.
All rows of one run are measured back to back, so compare ratios within a run. On CPU the children
run with glibc's MALLOC_MMAP_THRESHOLD_=65536: every large tensor is then its own mapping, returned to
the system when freed, so the peak RSS follows the peak of live tensors instead of heap fragmentation
(glibc otherwise raises the threshold as large blocks are freed and keeps them in the heap).

    python benchmarks/bench_memory.py --model vit_small_patch16_224 --batch_size 2 --sizes 224,448,672
"""
import argparse
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_step import (
    add_step_args,  # noqa: E402
    measure,  # noqa: E402
)
from bench_step import get_args as step_args  # noqa: E402

from util.args import HelpFormatter  # noqa: E402

GiB = 2 ** 30


def get_args(argv=None):
    p = argparse.ArgumentParser('python benchmarks/bench_memory.py', description=__doc__, formatter_class=HelpFormatter)
    add_step_args(p, model='vit_small_patch16_224', batch_size=2, steps=5, warmup=2)
    p.add_argument('--sizes', default='224,448,672', help='comma-separated input sizes in pixels')
    return p.parse_args(argv)


def run(args, size: int, mode: str, impl: str) -> tuple[float, int, int]:
    """(median seconds per step, peak bytes, peak bytes before the first step) in a child process."""
    argv = ['--model', args.model, '--batch_size', str(args.batch_size), '--input_size', str(size),
            '--drop_path', str(args.drop_path), '--device', args.device, '--steps', str(args.steps),
            '--warmup', str(args.warmup), '--threads', str(args.threads), '--attention_impl', impl]
    if args.amp:
        argv += ['--amp', args.amp]
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(step_args(argv), mode, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


ROWS = (('teacher_forward', 'fused'), ('none', 'fused'), ('copy', 'explicit'), ('copy', 'fused'),
        ('distill', 'explicit'), ('distill', 'fused'))


def print_table(args, results: dict, sizes: list[int]) -> None:
    """The markdown table of the sizes measured so far, and the time ratios at the first size."""
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'CPU x{torch.get_num_threads()}'
    memory = 'peak CUDA memory' if args.device.startswith('cuda') else 'peak RSS'
    print(f"\n{args.model} pair, batch {args.batch_size}, {device}, amp {args.amp or 'default'}, drop_path "
          f"{args.drop_path}, median of {args.steps} steps after {args.warmup} warm-up; memory ratios are to "
          "the plain student step\n")
    print(f"| px | N | mode | attention | ms / step | {memory} (GiB) | x plain | step memory (GiB) | x plain |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        n = (size // 16) ** 2 + 1
        _, plain_peak, plain_before = results[size, 'none', 'fused']
        for mode, impl in ROWS:
            sec, peak, before = results[size, mode, impl]
            name = 'teacher forward' if mode == 'teacher_forward' else mode
            shown_impl = '' if mode in ('teacher_forward', 'none') else impl
            print(f"| {size} | {n} | {name} | {shown_impl} | {sec * 1e3:.0f} | {peak / GiB:.3f} | "
                  f"{peak / plain_peak:.2f} | {(peak - before) / GiB:.3f} | "
                  f"{(peak - before) / (plain_peak - plain_before):.2f} |")
    size = sizes[0]
    base = results[size, 'teacher_forward', 'fused'][0] + results[size, 'none', 'fused'][0]
    print(f"\nat {size} px, t(step) / (t(teacher forward) + t(plain student step)):")
    for mode in ('copy', 'distill'):
        for impl in ('explicit', 'fused'):
            print(f"  {mode} {impl}: {results[size, mode, impl][0] / base:.3f}")
    print(flush=True)


def main(args) -> dict:
    if not args.device.startswith('cuda'):
        os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')  # read by each child's glibc at start
    sizes = [int(s) for s in args.sizes.split(',')]
    results = {}
    for i, size in enumerate(sizes):
        for mode, impl in ROWS:
            results[size, mode, impl] = run(args, size, mode, impl)
            sec, peak, before = results[size, mode, impl]
            print(f"# {size}px {mode} {impl}: {sec * 1e3:.0f} ms, peak {peak / GiB:.3f} GiB, "
                  f"step {(peak - before) / GiB:.3f} GiB", flush=True)
        print_table(args, results, sizes[:i + 1])  # a partial run still leaves its tables
    return results


if __name__ == '__main__':
    main(get_args())
