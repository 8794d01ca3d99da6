"""Time and memory of the training step and of the distillation loss: the library's code paths and the
authors' approach.

Step table (``--parts steps``): for each model (teacher and student of one architecture) and input size, a
plain student step, the teacher's forward, a copy step and a distill step (``--tasks``), each through
(``--paths``) the fused path (SDPA; the distillation loss through the attention kernels), the explicit path
(N x N maps, ``--attention_impl explicit``) and the authors' approach (benchmarks/baseline.py: float32,
explicit maps in every layer of both models, the teacher run to full depth, the loss through autograd).
A step is forward, losses (cross-entropy + 3 x the transfer loss), backward and AdamW of the student; the
plain and teacher rows run timm's own attention (fused: SDPA; explicit: timm's ``fused_attn`` off).
Columns: ms / step, images/s, peak memory, the step's own memory (peak minus what was there before),
the peak over the plain fused step's, and MFU (the model's FLOPs, counted by torch's FlopCounterMode in
the explicit row of the task, per second over a bf16 matrix-product rate measured in the same run). Then
what transfer costs beyond running a teacher beside a plain student:
t(step) / (t(teacher forward) + t(plain student step)).

Loss table (``--parts loss``): one layer's distillation loss alone, forward and backward from float32 q
and k at several token counts: the library's formulation, the library's explicit maps, the authors'.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set of a measurement run in
its own process (``--isolate``, with glibc's MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the
resident set and the peak follows the live tensors), n/a without ``--isolate``.

    python benchmarks/bench_step.py --models vit_tiny_patch16_224 --batch_size 32 --sizes 224
    # memory over input sizes on CPU, every row in its own process
    python benchmarks/bench_step.py --models vit_small_patch16_224 --batch_size 2 --sizes 224 448 672 \\
        --end_layer 0 --warmup 0 --steps 1 --isolate
    python benchmarks/bench_step.py --models dual_vit_large_patch16 --device cuda --parts steps loss

benchmarks/gpu_report.py runs the same measurements on a GPU, with the CUDA tests and the loader.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.baseline import authors_forward, authors_loss_from_qk  # noqa: E402
from models_attention import attention_logits_and_probs  # noqa: E402
from models_dual_vit import DualViT  # noqa: E402
from models_pairing import resolve_pairing  # noqa: E402
from models_transfer_losses import attention_cross_entropy, attention_distillation_loss  # noqa: E402
from models_vit import create_vit  # noqa: E402
from util.args import HelpFormatter, parse_kwargs  # noqa: E402
from util.config import Config  # noqa: E402
from util.precision import AMP_DTYPES, default_amp, hold_teacher, parameter_bytes  # noqa: E402

Tensor = torch.Tensor
GiB, MiB = 2 ** 30, 2 ** 20
TASKS = ('plain', 'teacher', 'copy', 'distill')
TASK_NAMES = {'plain': 'plain student step', 'teacher': 'teacher forward', 'copy': 'copy step',
              'distill': 'distill step'}
PATHS = ('fused', 'explicit', 'authors')
PATH_NAMES = {'fused': 'fused (SDPA)', 'explicit': 'explicit N x N maps', 'authors': "authors' approach (float32)"}


def explicit_distillation_loss(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float,
                               scale_t: float) -> Tensor:
    """The loss as ``--attention_impl explicit`` computes it: the library's maps (the teacher's under no_grad)
    and its cross-entropy."""
    logits, probs = attention_logits_and_probs(q_s, k_s, scale_s)
    with torch.no_grad():
        _, teacher_probs = attention_logits_and_probs(q_t, k_t, scale_t)
    return attention_cross_entropy(logits, teacher_probs, probs)


LOSSES: dict[str, Callable[..., Tensor]] = {'fused': attention_distillation_loss,
                                            'explicit': explicit_distillation_loss, 'authors': authors_loss_from_qk}
LOSS_NAMES = {'fused': 'through SDPA (library)', 'explicit': 'explicit maps (library)',
              'authors': "authors' (autograd)"}


@dataclass(frozen=True)
class StepSpec:
    model: str
    kwargs: tuple
    size: int
    batch: int
    task: str
    path: str
    device: str
    amp: str
    end_layer: int
    drop_path: float
    warmup: int
    steps: int
    count_flops: bool = False
    clock: str = 'wall'
    teacher_dtype: str = 'float32'  # the teacher's weights as --teacher_dtype holds them


@dataclass(frozen=True)
class LossSpec:
    path: str
    batch: int
    heads: int
    tokens: int
    head_dim: int
    device: str
    warmup: int
    steps: int
    clock: str = 'wall'


@dataclass
class Result:
    seconds: Optional[float] = None
    peak: Optional[int] = None  # bytes: CUDA max allocated, or the process's peak RSS with --isolate on CPU
    before: Optional[int] = None  # bytes allocated (RSS) before the timed calls
    flops: Optional[float] = None  # counted by FlopCounterMode over one step
    value: Optional[float] = None  # the loss's value (loss measurements)
    tokens: Optional[int] = None  # N, the tokens per image (step measurements)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None


SKIPPED = Result(error='not run: time budget spent')
CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}
CLOCK_NAMES = {'wall': 'wall-clock time', 'process': 'CPU time of the process'}


class Deadline:
    """No measurement starts once ``budget_s`` seconds have passed since the start (None: no limit)."""

    def __init__(self, budget_s: Optional[float] = None) -> None:
        self.end = None if budget_s is None else time.monotonic() + budget_s

    def left(self) -> float:
        return float('inf') if self.end is None else self.end - time.monotonic()

    @property
    def passed(self) -> bool:
        return self.left() <= 0


# ---------------------------------------------------------------------------------------------
# Clocks and memory
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _status_bytes(name: str) -> Optional[int]:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(name + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Set the process's peak resident set (VmHWM) to its current one (Linux: clear_refs 5), so that a later
    peak is the measurement's own and not, say, the imports' high-water mark."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory(device: torch.device, isolated: bool) -> Optional[int]:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    if not isolated:
        return None
    return _status_bytes('VmHWM') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device, isolated: bool,
          cleanup: Callable[[], None] = lambda: None, clock: str = 'wall') -> Result:
    """Median seconds of ``steps`` calls after ``warmup`` calls (wall-clock, or this process's CPU time), the
    peak memory of the timed calls (CUDA) or of the process (CPU, isolated), and the memory before them: on
    CUDA what stays allocated between calls (weights, optimizer state, inputs), on CPU the resident set
    before the first call (weights, inputs, the interpreter), with the process's peak reset to it there."""
    now = CLOCKS[clock]
    if device.type != 'cuda' and isolated:
        reset_peak_rss()
    before = peak_memory(device, isolated) if device.type != 'cuda' else None
    for _ in range(warmup):
        step()
    cleanup()
    sync(device)
    if device.type == 'cuda':
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = now()
        step()
        sync(device)
        times.append(now() - start)
    result = Result(seconds=statistics.median(times), peak=peak_memory(device, isolated), before=before)
    cleanup()
    return result


def count_flops(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, n: int, clock: str = 'wall', repeats: int = 10,
                dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` on ``device`` (the MFU denominator: the steps' own
    compute precision, so that a CPU without bf16 units is not measured against its slow bf16 emulation)."""
    now = CLOCKS[clock]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = now()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (now() - start)


# ---------------------------------------------------------------------------------------------
# Measurements: each a picklable spec, run here or in a child process (--isolate)
# ---------------------------------------------------------------------------------------------
def timm_fused_attention(vits, fused: bool) -> None:
    """timm's own attention of these ViTs through SDPA (``fused``) or explicit maps (timm's ``fused_attn``)."""
    for vit in vits:
        for blk in vit.blocks:
            blk.attn.fused_attn = fused


class Pair:
    """A teacher and a student of one architecture and input size, with the student's AdamW, shared by the
    rows of one model and size (each row wraps them in its own DualViT)."""

    def __init__(self, spec: StepSpec, device: torch.device) -> None:
        kwargs = dict(spec.kwargs)
        torch.manual_seed(0)
        with device:  # initialised where they run: ViT-L's weights are not built on the CPU first
            self.teacher = create_vit(spec.model, img_size=spec.size, **kwargs)
            self.student = create_vit(spec.model, img_size=spec.size, drop_path_rate=spec.drop_path, **kwargs)
        self.teacher.requires_grad_(False).eval()
        hold_teacher(self.teacher, spec.teacher_dtype)
        self.student.train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4, fused=device.type == 'cuda')
        self.x = torch.randn(spec.batch, 3, spec.size, spec.size, device=device)
        self.y = torch.randint(0, self.student.num_classes, (spec.batch,), device=device)

    def step_fn(self, spec: StepSpec, device: torch.device) -> Callable[[], None]:
        """One call = the row's work: a training step (forward, losses, backward, AdamW), or the teacher's
        forward under no_grad."""
        authors = spec.path == 'authors'
        dtype = None if authors else AMP_DTYPES[spec.amp]
        autocast = partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
        # plain and teacher rows: timm's attention as the path says; transfer rows: the library's layers
        # without transfer run timm's SDPA, the authors' approach explicit maps everywhere
        fused = spec.path == 'fused' if spec.task in ('plain', 'teacher') else not authors
        timm_fused_attention([self.student, self.teacher], fused)
        if spec.task == 'teacher':
            def teacher_forward():
                with torch.no_grad(), autocast():
                    self.teacher(self.x)
            return teacher_forward
        if spec.task == 'plain':
            forward = partial(self.student, self.x)
        else:
            depths = len(self.student.blocks), len(self.teacher.blocks)
            pairs, layers = resolve_pairing(*depths, end_layer=spec.end_layer)
            pair = DualViT(self.student, self.teacher, mode=spec.task, pairs=pairs, layers=layers,
                           attention_impl='fused' if spec.path == 'fused' else 'explicit').train()
            if authors:
                def forward():
                    return authors_forward(pair, self.x, pair.draw_drop_path_masks(self.x.shape[0], device))
            else:
                forward = partial(pair, self.x)

        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # as main_finetune.py

        def train_step():
            self.optimizer.zero_grad(set_to_none=True)
            with autocast():
                out = forward()
                logits, aux = out if isinstance(out, tuple) else (out, None)
                loss = F.cross_entropy(logits, self.y)
                if aux is not None:
                    loss = loss + 3.0 * aux
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
        return train_step

    def free_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


_PAIRS: dict = {}


def release_pairs() -> None:
    _PAIRS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_step(spec: StepSpec, isolated: bool = False) -> Result:
    device = torch.device(spec.device)
    try:
        key = (spec.model, spec.kwargs, spec.size, spec.batch, spec.drop_path, spec.teacher_dtype)
        if key not in _PAIRS:
            release_pairs()
            _PAIRS[key] = Pair(spec, device)
        pair = _PAIRS[key]
        step = pair.step_fn(spec, device)
        result = timed(step, spec.warmup, spec.steps, device, isolated, cleanup=pair.free_gradients, clock=spec.clock)
        if spec.count_flops:
            result.flops = count_flops(step)
            pair.free_gradients()
        result.tokens = pair.student.patch_embed.num_patches + pair.student.num_prefix_tokens
        return result
    except Exception as e:  # out of memory, or a kernel this machine lacks: the row says so, the run goes on
        return Result(error=describe_error(e))
    finally:
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def loss_inputs(spec: LossSpec, device: torch.device) -> list[Tensor]:
    """Student and teacher q and k (B, H, N, head_dim), float32, with attention as peaked as a trained ViT's;
    the student's require gradients."""
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (spec.batch, spec.heads, spec.tokens, spec.head_dim)
    tensors = [(torch.randn(shape, generator=g) * 1.5).to(device) for _ in range(4)]
    tensors[0].requires_grad_(True)
    tensors[1].requires_grad_(True)
    return tensors


def measure_loss(spec: LossSpec, isolated: bool = False) -> Result:
    device = torch.device(spec.device)
    fn, scale = LOSSES[spec.path], spec.head_dim ** -0.5
    try:
        q_s, k_s, q_t, k_t = loss_inputs(spec, device)

        def step():
            fn(q_s, k_s, q_t, k_t, scale, scale).backward()

        def drop_grads():
            q_s.grad = k_s.grad = None

        result = timed(step, spec.warmup, spec.steps, device, isolated, cleanup=drop_grads, clock=spec.clock)
        with torch.no_grad():
            result.value = float(fn(q_s, k_s, q_t, k_t, scale, scale))
        return result
    except Exception as e:
        return Result(error=describe_error(e))
    finally:
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def describe_error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return 'out of memory'
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return f"{type(e).__name__}: {first[:160]}"


def _child(fn, spec, queue) -> None:
    queue.put(fn(spec, isolated=True))


def run_measurement(fn, spec, isolate: bool) -> Result:
    """``fn(spec)`` here, or in a fresh process whose peak memory is this measurement's alone."""
    if not isolate:
        return fn(spec)
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, spec, queue))
    proc.start()
    try:
        result = queue.get()
    except Exception as e:  # the child died before answering
        result = Result(error=describe_error(e))
    proc.join()
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def gib(n: Optional[int]) -> str:
    return 'n/a' if n is None else f"{n / GiB:.2f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a is not None and b else 'n/a'


def step_memory(r: Result) -> Optional[int]:
    """The memory a measurement added to what was allocated before it (bytes), where known."""
    return r.peak - r.before if r.ok and r.peak is not None and r.before is not None else None


def model_label(model: str, kwargs: tuple) -> str:
    return model + (' (' + ', '.join(f"{k}={v}" for k, v in kwargs) + ')' if kwargs else '')


def memory_name(device: str) -> str:
    return 'peak CUDA memory' if device.startswith('cuda') else 'peak RSS'


def step_intro(args, peak_rate: Optional[float]) -> list[str]:
    rate = f"{peak_rate / 1e12:.1f} TFLOP/s" if peak_rate else 'not measured'
    return [f"Batch {args.batch_size}; copy and distill transfer layers [0, depth {args.end_layer:+d}) "
            f"(--end_layer {args.end_layer}; the authors' approach runs the teacher to full depth all the same); "
            f"drop_path {args.drop_path}; autocast {args.amp} except the authors' approach (float32); median of "
            f"{args.steps} steps after {args.warmup} ({CLOCK_NAMES[args.clock]}). Step memory: the peak minus "
            "the memory before the steps. x plain: the peak over the plain fused step's. MFU: the FLOPs counted "
            f"in the explicit row of the task per second, over the matrix-product rate measured here in the steps' "
            f"precision ({rate}, {args.matmul_size}^3 {args.amp if args.amp != 'none' else 'float32'} products).", '']


def step_table(args, results: dict, peak_rate: Optional[float]) -> list[str]:
    """The markdown step table of ``results`` {(model, kwargs, size): [(spec, result)]}, and per model and size
    t(step) / (t(teacher forward) + t(plain student step)) of each transfer row."""
    rows = [f"| model | px | N | row | path | ms / step | images / s | {memory_name(args.device)} (GiB) | "
            "step memory (GiB) | x plain | MFU |",
            '| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    costs = []
    for (model, kwargs, size), specs in results.items():
        by = {(spec.task, spec.path): r for spec, r in specs}
        flops = {spec.task: r.flops for spec, r in specs if r.flops}
        n = next((r.tokens for _, r in specs if r.tokens), '')
        plain = by.get(('plain', 'fused'))
        plain_peak = plain.peak if plain is not None and plain.ok else None
        for spec, r in specs:
            head = (f"| {model_label(model, kwargs)} | {size} | {n} | {TASK_NAMES[spec.task]} | "
                    f"{PATH_NAMES[spec.path]} |")
            if not r.ok:
                rows.append(f"{head} {r.error} | | | | | |")
                continue
            mfu = f"{flops[spec.task] / r.seconds / peak_rate:.1%}" if peak_rate and spec.task in flops else 'n/a'
            rows.append(f"{head} {r.seconds * 1e3:.1f} | {spec.batch / r.seconds:.1f} | {gib(r.peak)} | "
                        f"{gib(step_memory(r))} | {ratio(r.peak, plain_peak)} | {mfu} |")
        base = [by.get((task, 'fused')) for task in ('teacher', 'plain')]
        if all(b is not None and b.ok for b in base):
            parts = [f"{task} {path} {by[task, path].seconds / (base[0].seconds + base[1].seconds):.3f}"
                     for task in ('copy', 'distill') for path in PATHS if (task, path) in by and by[task, path].ok]
            if parts:
                costs.append(f"- {model_label(model, kwargs)}, {size} px: " + ', '.join(parts))
    if costs:
        rows += ['', 't(step) / (t(teacher forward) + t(plain student step)), both fused: what transfer costs '
                 'beyond running a teacher beside a plain student:', '', *costs]
    return rows


def step_specs(args, model: str, kwargs: tuple, size: int) -> list[StepSpec]:
    base = StepSpec(model=model, kwargs=kwargs, size=size, batch=args.batch_size, task='plain', path='fused',
                    device=args.device, amp=args.amp, end_layer=args.end_layer, drop_path=args.drop_path,
                    warmup=args.warmup, steps=args.steps, clock=args.clock)
    return [replace(base, task=task, path=path, count_flops=path == 'explicit')
            for task in args.tasks for path in args.paths]


def run_steps(args, deadline: Deadline, on_group: Callable[[dict, Optional[float]], None] = lambda *a: None):
    """Every row of the step table, a model and size at a time (``on_group`` called after each); returns the
    results {(model, kwargs, size): [(spec, result)]} and the measured matrix-product rate."""
    peak_rate = matmul_rate(torch.device(args.device), args.matmul_size, args.clock,
                            dtype=AMP_DTYPES[args.amp] or torch.float32)
    results: dict = {}
    for model, kwargs in args.model_specs:
        for size in args.sizes:
            group = results.setdefault((model, kwargs, size), [])
            for spec in step_specs(args, model, kwargs, size):
                r = SKIPPED if deadline.passed else run_measurement(measure_step, spec, args.isolate)
                group.append((spec, r))
                print(f"# {model} {size}px {spec.task} {spec.path}: "
                      + (f"{spec.batch / r.seconds:.1f} img/s, peak {gib(r.peak)} GiB" if r.ok else r.error),
                      flush=True)
            release_pairs()
            on_group(results, peak_rate)
    return results, peak_rate


def run_teacher_dtype(args, deadline: Deadline) -> list[str]:
    """The distill step of the largest model at the smallest size, fused, with the teacher's weights held in
    float32 and in bf16 (--teacher_dtype): speed, peak memory and the teacher's parameter bytes."""
    (model, kwargs), size = args.model_specs[-1], min(args.sizes)
    rows = [f"A distill step (fused) of {model_label(model, kwargs)} at {size} px, batch {args.batch_size}, "
            f"--amp {args.amp}, with the frozen teacher's weights held in float32 and in bf16 (--teacher_dtype; "
            "bf16 needs --amp bf16). Teacher weights: its parameters' bytes in that precision.", '',
            f"| teacher weights | img/s | peak {memory_name(args.device)} (GiB) | teacher weights (MiB) |",
            '| --- | ---: | ---: | ---: |']
    for dtype in ('float32', 'bf16'):
        if dtype == 'bf16' and args.amp != 'bf16':
            rows.append(f"| {dtype} | needs --amp bf16 | | |")
            continue
        spec = replace(step_specs(args, model, kwargs, size)[0], task='distill', path='fused', teacher_dtype=dtype,
                       count_flops=False)
        r = SKIPPED if deadline.passed else run_measurement(measure_step, spec, args.isolate)
        with torch.device('meta'):
            teacher = create_vit(model, img_size=size, **dict(kwargs))
        hold_teacher(teacher, dtype)
        weights = f"{parameter_bytes(teacher) / 2**20:.1f}"
        rows.append(f"| {dtype} | {spec.batch / r.seconds:.1f} | {gib(r.peak)} | {weights} |" if r.ok else
                    f"| {dtype} | {r.error} | | {weights} |")
        print(f"# teacher {dtype}: " + (f"peak {gib(r.peak)} GiB" if r.ok else r.error), flush=True)
    release_pairs()
    return rows


def run_loss(args, deadline: Deadline) -> list[str]:
    """The loss table, measured."""
    rows = [f"Forward and backward of one layer's loss from float32 q, k (batch {args.loss_batch}, "
            f"{args.loss_heads} heads, head_dim {args.loss_head_dim}; gradients for the student's q and k), median "
            f"of {args.steps} after {args.warmup} ({CLOCK_NAMES[args.clock]}). Memory: the peak minus the inputs. "
            "The last column is the value's relative difference from the explicit maps' value.", '',
            f"| N | formulation | ms | x explicit | {memory_name(args.device)} above the inputs (MiB) | x explicit | "
            "value vs explicit |", '| ---: | --- | ---: | ---: | ---: | ---: | ---: |']
    for n in args.loss_tokens:
        results = {}
        for path in args.paths:
            spec = LossSpec(path=path, batch=args.loss_batch, heads=args.loss_heads, tokens=n,
                            head_dim=args.loss_head_dim, device=args.device, warmup=args.warmup, steps=args.steps,
                            clock=args.clock)
            r = results[path] = SKIPPED if deadline.passed else run_measurement(measure_loss, spec, args.isolate)
            print(f"# loss N={n} {path}: " + (f"{r.seconds * 1e3:.1f} ms" if r.ok else r.error), flush=True)
        ref = results.get('explicit', SKIPPED)
        for path, r in results.items():
            if not r.ok:
                rows.append(f"| {n} | {LOSS_NAMES[path]} | {r.error} | | | | |")
                continue
            used, ref_used = step_memory(r), step_memory(ref)
            rows.append(f"| {n} | {LOSS_NAMES[path]} | {r.seconds * 1e3:.1f} | "
                        f"{ratio(r.seconds, ref.seconds if ref.ok else None)} | "
                        f"{'n/a' if used is None else f'{used / MiB:.0f}'} | {ratio(used, ref_used)} | "
                        + (f"{r.value / ref.value - 1:.1e}" if ref.ok and ref.value else 'n/a') + " |")
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser, models: list[str], sizes: list[int], batch_size: int) -> None:
    """The options of the step and loss measurements, shared with gpu_report.py (with its own defaults)."""
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    p.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='autocast of the library\'s rows (default: bf16 on CUDA, none elsewhere)')
    p.add_argument('--clock', default='wall', choices=list(CLOCKS),
                   help='what a measurement times: wall-clock seconds, or (CPU only) this process\'s CPU seconds, '
                        'steadier on a machine shared with other work (with one thread: OMP_NUM_THREADS=1)')
    p.add_argument('--isolate', action='store_true',
                   help='each measurement in its own process, so that its peak memory is its own (on CPU: the '
                        'peak RSS, under glibc\'s MALLOC_MMAP_THRESHOLD_=65536; without it CPU memory is n/a)')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls before each measurement')
    p.add_argument('--steps', type=int, default=5, help='timed calls per measurement (median reported)')
    p.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS,
                   help='fused (SDPA), explicit (N x N maps), authors (benchmarks/baseline.py); rows of both tables')
    g = p.add_argument_group('step table')
    g.add_argument('--models', nargs='+', default=models,
                   help='timm ViT names, dual_vit_* or MAE names (teacher and student of one architecture)')
    g.add_argument('--model_kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='timm architecture arguments for every model, e.g. patch_size=4 embed_dim=64 depth=4')
    g.add_argument('--sizes', nargs='+', type=int, default=sizes, help='input sizes in pixels')
    g.add_argument('--batch_size', type=int, default=batch_size, help='images per step')
    g.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS, help='rows of the step table')
    g.add_argument('--end_layer', type=int, default=-3,
                   help='transfer layers [0, depth + end_layer) (-3: what the authors\' released code does)')
    g.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth of the student')
    g.add_argument('--matmul_size', type=int, default=None,
                   help='side of the matrix product (in the steps\' precision) timed for MFU '
                        '(default: 8192 on CUDA, 1024 on CPU)')
    g = p.add_argument_group('the distillation loss alone')
    g.add_argument('--loss_tokens', nargs='+', type=int, default=[197, 785, 1765], help='token counts N')
    g.add_argument('--loss_batch', type=int, default=32, help='batch')
    g.add_argument('--loss_heads', type=int, default=16, help='heads (ViT-L: 16)')
    g.add_argument('--loss_head_dim', type=int, default=64, help='head dimension (ViT-L: 64)')


def resolve_args(p: argparse.ArgumentParser, args: argparse.Namespace, kwargs: Optional[dict] = None) -> Config:
    """The read-only configuration: defaults that depend on the device, and the models with their architecture
    arguments (``kwargs`` instead of --model_kwargs where given)."""
    cuda = args.device.startswith('cuda')
    if args.clock == 'process' and cuda:
        p.error('--clock process: CUDA kernels run asynchronously, off this process\'s CPU time; use --clock wall')
    if cuda and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is visible; use --device cpu on a machine without GPU')
    if kwargs is None:
        kwargs = parse_kwargs(args.model_kwargs, '--model_kwargs')
    return Config.of(args, model_specs=[(m, tuple(kwargs.items())) for m in args.models],
                     amp=args.amp or default_amp(args.device), matmul_size=args.matmul_size or (8192 if cuda else 1024))


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python benchmarks/bench_step.py', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--parts', nargs='+', default=['steps'], choices=['steps', 'loss'], help='the tables to measure')
    add_args(p, models=['vit_tiny_patch16_224'], sizes=[224], batch_size=32)
    return resolve_args(p, p.parse_args(argv))


def main(args) -> dict:
    if args.isolate and not args.device.startswith('cuda'):
        os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')  # read by each child's glibc at start
    deadline, results = Deadline(), {}
    if 'steps' in args.parts:
        results, peak_rate = run_steps(args, deadline)
        print('\n' + '\n'.join(step_intro(args, peak_rate) + step_table(args, results, peak_rate)) + '\n')
    if 'loss' in args.parts:
        print('\n' + '\n'.join(run_loss(args, deadline)) + '\n', flush=True)
    return results


if __name__ == '__main__':
    main(get_args())
