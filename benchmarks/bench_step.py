"""Time one training step per mode, and the teacher's forward alone.

A step is forward, losses, backward and an AdamW update of the student. Each mode runs in its own
child process so its peak memory is its own (CUDA: max allocated; CPU: peak resident set size).
The last lines are the ratios t(distill step) / (t(teacher forward) + t(plain student step)) and
t(copy step) / (same): what attention transfer costs beyond running a teacher beside a plain student
(targets: <= 1.10 and <= 1.05). benchmarks/bench_memory.py runs it over input sizes and both
attention implementations.

    python benchmarks/bench_step.py --model vit_tiny_patch16_224 --batch_size 32 --input_size 224
    python benchmarks/bench_step.py --model dual_vit_large_patch16 --batch_size 32 --device cuda --amp bf16
"""
import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models_dual_vit import ATTENTION_IMPL_CHOICES, build_dual_vit, resolve_attention_impl  # noqa: E402
from util.args import HelpFormatter, parse_kwargs  # noqa: E402

MODES = ('teacher_forward', 'none', 'copy', 'distill')


def add_step_args(p: argparse.ArgumentParser, model: str, batch_size: int, steps: int, warmup: int) -> None:
    """The options of a timed step that bench_step.py and bench_memory.py share (with their own defaults)."""
    p.add_argument('--model', default=model, help='dual_vit_*, MAE or timm ViT name')
    p.add_argument('--batch_size', type=int, default=batch_size, help='images per step')
    p.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth rate of the student')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                   help='autocast precision (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--steps', type=int, default=steps, help='timed steps per measurement (median reported)')
    p.add_argument('--warmup', type=int, default=warmup, help='untimed steps per measurement before timing')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')


def get_args(argv=None):
    p = argparse.ArgumentParser('python benchmarks/bench_step.py', description=__doc__, formatter_class=HelpFormatter)
    add_step_args(p, model='vit_tiny_patch16_224', batch_size=32, steps=10, warmup=3)
    p.add_argument('--input_size', type=int, default=224, help='image side in pixels')
    p.add_argument('--clock', default='wall', choices=['wall', 'process'],
                   help="wall-clock time, or the process's CPU time (CPU runs on a shared machine, with --threads 1)")
    p.add_argument('--model_kwargs', default={}, nargs='*', metavar='KEY=VALUE',
                   help='timm architecture arguments of teacher and student, e.g. embed_dim=384 num_heads=6')
    p.add_argument('--nb_classes', type=int, default=1000, help='classifier width')
    p.add_argument('--end_layer', type=int, default=0, help='transfer layers [0, depth + end_layer)')
    p.add_argument('--modes', default=','.join(MODES), help=f'comma-separated subset of {",".join(MODES)}')
    p.add_argument('--attention_impl', default='fused', choices=list(ATTENTION_IMPL_CHOICES),
                   help='attention of the transfer modes: SDPA (the loss through the attention kernels), explicit '
                        'N x N maps, or auto (explicit on CPU, fused on CUDA, as main_finetune.py\'s default)')
    args = p.parse_args(argv)
    if args.amp is None:
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    args.attention_impl = resolve_attention_impl(args.attention_impl, args.device)
    args.model_kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    return args


def peak_memory(device: torch.device) -> int:
    """Bytes: peak CUDA memory allocated since the last reset, or the process's peak resident set
    size so far on CPU (Linux reports KiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args, mode: str, queue) -> None:
    """Child process: time ``mode`` and put (median seconds per step, peak bytes, peak bytes before
    the first step) on the queue."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    transfer = 'distill' if mode == 'teacher_forward' else mode
    model = build_dual_vit(args.model, mode=transfer, drop_path_rate=args.drop_path, end_layer=args.end_layer,
                           num_classes=args.nb_classes, img_size=args.input_size,
                           attention_impl=args.attention_impl, teacher_kwargs=args.model_kwargs).to(device)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.nb_classes, (args.batch_size,), device=device)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-4)
    model.train()

    def step():
        if mode == 'teacher_forward':
            with torch.no_grad(), autocast:
                model.teacher(x)
            return
        with autocast:
            out = model(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits, y)
            if aux is not None:
                loss = loss + 3.0 * aux
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    before = peak_memory(device)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    clock = time.process_time if args.clock == 'process' else time.perf_counter
    for _ in range(args.steps):
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    queue.put((statistics.median(times), peak_memory(device), before))


def main(args) -> dict:
    ctx = mp.get_context('spawn')
    results = {}
    for mode in args.modes.split(','):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args, mode, queue))
        proc.start()
        results[mode] = queue.get()
        proc.join()
    memory = 'peak CUDA memory' if args.device.startswith('cuda') else 'peak RSS'
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'CPU x{torch.get_num_threads()}'
    print(f"\n{args.model}, batch {args.batch_size}, {args.input_size}px, {device}, amp {args.amp}, "
          f"attention {args.attention_impl}, {args.model_kwargs or ''} {args.clock} clock, "
          f"end_layer {args.end_layer}, median of {args.steps} steps\n")
    print(f"| mode | ms / step | images / s | {memory} (GiB) |")
    print("| --- | ---: | ---: | ---: |")
    for mode, (sec, peak, _) in results.items():
        name = 'teacher forward (no grad)' if mode == 'teacher_forward' else f'{mode} step'
        print(f"| {name} | {sec * 1e3:.1f} | {args.batch_size / sec:.1f} | {peak / 2 ** 30:.2f} |")
    if {'teacher_forward', 'none', 'distill'} <= results.keys():
        ratio = results['distill'][0] / (results['teacher_forward'][0] + results['none'][0])
        print(f"\nt(distill step) / (t(teacher forward) + t(plain student step)) = {ratio:.3f}")
    if {'teacher_forward', 'none', 'copy'} <= results.keys():
        ratio = results['copy'][0] / (results['teacher_forward'][0] + results['none'][0])
        print(f"t(copy step) / (t(teacher forward) + t(plain student step)) = {ratio:.3f}")
    return results


if __name__ == '__main__':
    main(get_args())
