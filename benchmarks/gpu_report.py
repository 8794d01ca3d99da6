"""Everything a GPU must show, in one command that writes its tables to one markdown file.

On one NVIDIA GPU, in one process tree, in under 8 minutes (``--budget_s``: no measurement starts after
it; the file is rewritten after every part, so an interrupted run leaves the tables it finished):

1. CUDA tests: ``pytest tests/test_cuda.py`` (bf16 autocast against float32 in every transfer mode,
   fused against explicit, the distillation loss under autocast, a DDP step under torchrun, a
   checkpoint and an exact resume on CUDA), one row per test.
2. Step table: for each model (ViT-B/16, ViT-L/16 pairs), input size (224, 448 px) and batch (32): a plain
   student step, the teacher's forward, a copy step and a distill step, each through the fused path
   (SDPA; for distill with both formulations of the distillation loss: the library's, through the
   attention kernels, and the chunked op), the explicit path (N x N maps), and the authors' approach
   (float32, explicit maps in every layer of both models, the teacher run to full depth, the loss through
   autograd): images/s, peak memory (``torch.cuda.max_memory_allocated``) and MFU against a bf16
   matrix-multiply rate measured in the same run.
3. The distillation loss alone (forward and backward) at N = 197, 785 and 1765 tokens with ViT-L's heads:
   the library's formulation, the chunked op, and explicit maps; time and peak memory.
4. Loader against step: the training loader's images/s (MAE recipe transforms, workers on all the
   machine's cores, generated ImageNet-like JPEGs) against the largest model's distill step.

    python benchmarks/gpu_report.py                    # on a GPU machine: writes gpu_report.md
    python benchmarks/gpu_report.py --smoke            # every part on CPU, tiny model, one step each (CI)
    # the CPU comparison of docs/PERFORMANCE.md: ViT-S/16 pair, batch 2, each row in its own process
    python benchmarks/gpu_report.py --device cpu --parts steps --models vit_small_patch16_224 \\
        --sizes 224 448 --batch_size 2 --warmup 1 --steps 3 --isolate

It needs only the project's requirements and runs under the torch a GPU machine already has; the
report states the versions and what requirements.txt pins.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models_dual_vit  # noqa: E402
from models_dual_vit import (  # noqa: E402
    DualViT,
    attention_cross_entropy,
    attention_logits_and_probs,
    block_forward,
    create_vit,
    embed_tokens,
    transfer_attention,
)
from util.args import HelpFormatter, parse_kwargs  # noqa: E402

Tensor = torch.Tensor
GiB = 2 ** 30
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
TASKS = ('plain', 'teacher', 'copy', 'distill')
TASK_NAMES = {'plain': 'plain student step', 'teacher': 'teacher forward', 'copy': 'copy step',
              'distill': 'distill step'}
PATH_NAMES = {
    'fused': 'fused (SDPA)',
    'sdpa_loss': 'fused, loss through SDPA (library)',
    'chunked_loss': 'fused, chunked loss op',
    'explicit': 'explicit N x N maps',
    'authors': "authors' approach (float32)",
}
# The tiny ViT of --smoke: 32 px / patch 8 (17 tokens), and 64 px (65 tokens).
SMOKE_KWARGS = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


# ---------------------------------------------------------------------------------------------
# The two formulations of the distillation loss: the library's (models_dual_vit.attention_distillation_loss,
# through the attention kernels) and the chunked op it replaced, kept here so that a GPU run can compare them.
# ---------------------------------------------------------------------------------------------
class ChunkedAttentionCrossEntropy(torch.autograd.Function):
    """Mean over (batch, head, query row) of CE(softmax(T), softmax(S)), S = q_s k_s^T * scale_s,
    T = q_t k_t^T * scale_t, in query-row chunks, without an N x N tensor kept for backward.

    Forward walks the rows in chunks and saves its inputs and the log-sum-exp of S and T per row; backward
    recomputes S and T chunk by chunk, the gradient of the student logits being (softmax(S) - softmax(T)) /
    rows. The teacher's inputs get gradients only when they require them. Runs in the inputs' dtype
    (float32 or wider) with autocast off."""

    @staticmethod
    def forward(ctx, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
                scale_s: float, scale_t: float, chunk: int) -> Tensor:
        n = q_s.shape[-2]
        rows = q_s.numel() // q_s.shape[-1]
        lse_s = q_s.new_empty(q_s.shape[:-1])
        lse_t = q_s.new_empty(q_s.shape[:-1])
        total = q_s.new_zeros(())
        with torch.autocast(q_s.device.type, enabled=False):
            for lo in range(0, n, chunk):
                r = slice(lo, lo + chunk)
                s = (q_s[..., r, :] * scale_s) @ k_s.transpose(-2, -1)
                t = (q_t[..., r, :] * scale_t) @ k_t.transpose(-2, -1)
                lse_s[..., r] = torch.logsumexp(s, dim=-1)
                lse_t[..., r] = torch.logsumexp(t, dim=-1)
                p_t = torch.exp(t - lse_t[..., r, None])
                total += (lse_s[..., r] - (p_t * s).sum(dim=-1)).sum()
        ctx.save_for_backward(q_s, k_s, q_t, k_t, lse_s, lse_t)
        ctx.scales, ctx.chunk, ctx.rows = (scale_s, scale_t), chunk, rows
        return total / rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_s, k_s, q_t, k_t, lse_s, lse_t = ctx.saved_tensors
        scale_s, scale_t = ctx.scales
        grad_student = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_teacher = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dq_s = torch.zeros_like(q_s) if grad_student else None
        dk_s = torch.zeros_like(k_s) if grad_student else None
        dq_t = torch.zeros_like(q_t) if grad_teacher else None
        dk_t = torch.zeros_like(k_t) if grad_teacher else None
        g = grad_out.to(q_s.dtype) / ctx.rows
        with torch.autocast(q_s.device.type, enabled=False):
            for lo in range(0, q_s.shape[-2], ctx.chunk):
                r = slice(lo, lo + ctx.chunk)
                s = (q_s[..., r, :] * scale_s) @ k_s.transpose(-2, -1)
                t = (q_t[..., r, :] * scale_t) @ k_t.transpose(-2, -1)
                p_t = torch.exp(t - lse_t[..., r, None])
                if grad_teacher:  # d CE / d T = -p_t * (S - sum_j p_t S)
                    ds_t = p_t * (s - (p_t * s).sum(dim=-1, keepdim=True)) * -g
                    dq_t[..., r, :] = (ds_t @ k_t) * scale_t
                    dk_t += (ds_t.transpose(-2, -1) @ q_t[..., r, :]) * scale_t
                if grad_student:
                    ds = (torch.exp(s - lse_s[..., r, None]) - p_t) * g
                    dq_s[..., r, :] = (ds @ k_s) * scale_s
                    dk_s += (ds.transpose(-2, -1) @ q_s[..., r, :]) * scale_s
        return dq_s, dk_s, dq_t, dk_t, None, None, None


def chunked_distillation_loss(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float,
                              chunk: int = 64) -> Tensor:
    """The attention distillation loss as the chunked op (the signature of
    models_dual_vit.attention_distillation_loss), in float32 or the inputs' wider dtype."""
    dtype = torch.promote_types(torch.promote_types(q_s.dtype, q_t.dtype), torch.float32)
    q_s, k_s, q_t, k_t = (a.to(dtype) for a in (q_s, k_s, q_t, k_t))
    return ChunkedAttentionCrossEntropy.apply(q_s, k_s, q_t, k_t, float(scale_s), float(scale_t), int(chunk))


def explicit_distillation_loss(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float,
                               scale_t: float) -> Tensor:
    """The loss from explicit maps, as ``--attention_impl explicit`` computes it (the teacher's under no_grad)."""
    logits, probs = attention_logits_and_probs(q_s, k_s, scale_s)
    with torch.no_grad():
        _, teacher_probs = attention_logits_and_probs(q_t, k_t, scale_t)
    return attention_cross_entropy(logits, teacher_probs, probs)


library_distillation_loss = models_dual_vit.attention_distillation_loss
LOSS_FORMULATIONS: dict[str, Callable[..., Tensor]] = {
    'SDPA formulation (library)': library_distillation_loss,
    'chunked op (64 rows)': chunked_distillation_loss,
    'explicit maps': explicit_distillation_loss,
}


@contextlib.contextmanager
def distillation_loss(fn: Callable[..., Tensor]):
    """The transfer loop's distillation loss replaced by ``fn`` (models_dual_vit.transfer_loss calls the module's
    attention_distillation_loss)."""
    library = models_dual_vit.attention_distillation_loss
    models_dual_vit.attention_distillation_loss = fn
    try:
        yield
    finally:
        models_dual_vit.attention_distillation_loss = library


# ---------------------------------------------------------------------------------------------
# The authors' approach, on this project's models: float32, explicit maps in every layer of both models,
# the teacher run to full depth with all its maps kept, the distillation loss through autograd.
# ---------------------------------------------------------------------------------------------
def _explicit(attn, **kw):
    return partial(transfer_attention, attn, impl='explicit', **kw)


def authors_forward(pair: DualViT, x: Tensor, masks: Optional[list] = None):
    """The pair's training forward as the authors' code computes it: logits, and in distill mode the summed
    loss over the transferred layers, -sum_j softmax(T)_ij log_softmax(S)_ij averaged over rows."""
    teacher, student, mode = pair.teacher, pair.student, pair.mode
    with torch.no_grad():
        tx, teacher_logits = embed_tokens(teacher, x), []
        for i, blk in enumerate(teacher.blocks):
            tx, captured = block_forward(blk, tx, _explicit(blk.attn, expose='attn'), masks[i] if masks else None)
            teacher_logits.append(captured['attn_logits'])
    sx, loss = embed_tokens(student, x), None
    for i, blk in enumerate(student.blocks):
        if mode.use == 'replace' and i in pair.layers:
            attention = _explicit(blk.attn, given={'attn': teacher_logits[i].softmax(dim=-1)})
        else:
            attention = _explicit(blk.attn, expose='attn')
        sx, captured = block_forward(blk, sx, attention, masks[i] if masks else None)
        if mode.use == 'loss' and i in pair.layers:
            ce = -(teacher_logits[i].softmax(dim=-1) * captured['attn_logits'].log_softmax(dim=-1)).sum(dim=-1).mean()
            loss = ce if loss is None else loss + ce
    logits = student.forward_head(student.norm(sx))
    return (logits, loss) if mode.use == 'loss' else logits


@contextlib.contextmanager
def timm_attention(vits, fused: bool):
    """timm's own attention of these ViTs through SDPA (``fused``) or explicit maps."""
    modules = [blk.attn for vit in vits for blk in vit.blocks]
    before = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = fused
    try:
        yield
    finally:
        for m, value in zip(modules, before):
            m.fused_attn = value


# ---------------------------------------------------------------------------------------------
# Measurements: each a picklable spec, run here or in a child process (--isolate)
# ---------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class LossSpec:
    formulation: str
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
    peak: Optional[int] = None  # bytes: CUDA max allocated, or the child's peak RSS with --isolate on CPU
    before: Optional[int] = None  # bytes allocated (RSS) before the timed steps
    flops: Optional[float] = None  # counted by FlopCounterMode over one step
    value: Optional[float] = None  # the loss's value (loss measurements)
    tokens: Optional[int] = None  # N, the tokens per image (step measurements)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
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


CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}
CLOCK_NAMES = {'wall': 'wall-clock time', 'process': 'CPU time of the process'}


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


class Pair:
    """A teacher and a student of one architecture and input size, with the student's AdamW, shared by the
    rows of the step table (each path wraps them in its own DualViT)."""

    def __init__(self, spec: StepSpec, device: torch.device) -> None:
        kwargs = dict(spec.kwargs)
        torch.manual_seed(0)
        with device:  # initialised where they run: ViT-L's weights are not built on the CPU first
            self.teacher = create_vit(spec.model, img_size=spec.size, **kwargs)
            self.student = create_vit(spec.model, img_size=spec.size, drop_path_rate=spec.drop_path, **kwargs)
        self.teacher.requires_grad_(False).eval()
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
        if spec.task == 'teacher':
            def teacher_forward():
                with torch.no_grad(), autocast(), timm_attention([self.teacher], fused=spec.path == 'fused'):
                    self.teacher(self.x)
            return teacher_forward
        loss_fn = chunked_distillation_loss if spec.path == 'chunked_loss' else library_distillation_loss
        if spec.task == 'plain':
            forward, timm_fused = partial(self.student, self.x), spec.path == 'fused'
        else:
            impl = 'explicit' if spec.path in ('explicit', 'authors') else 'fused'
            pair = DualViT(self.student, self.teacher, mode=spec.task, end_layer=spec.end_layer, attention_impl=impl)
            pair.train()
            timm_fused = not authors  # layers without transfer: timm's own attention, as the library runs it
            if authors:
                def forward():
                    return authors_forward(pair, self.x, pair.draw_drop_path_masks(self.x.shape[0], device))
            else:
                forward = partial(pair, self.x)

        def train_step():
            self.optimizer.zero_grad(set_to_none=True)
            with timm_attention([self.student, self.teacher], fused=timm_fused), distillation_loss(loss_fn):
                with autocast():
                    out = forward()
                    logits, aux = out if isinstance(out, tuple) else (out, None)
                    loss = F.cross_entropy(logits, self.y)
                    if aux is not None:
                        loss = loss + 3.0 * aux
                loss.backward()
            self.optimizer.step()
        return train_step

    def free_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


_PAIRS: dict = {}


def measure_step(spec: StepSpec, isolated: bool = False) -> Result:
    device = torch.device(spec.device)
    try:
        key = (spec.model, spec.kwargs, spec.size, spec.batch, spec.drop_path)
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
    except Exception as e:  # out of memory, or a kernel this machine lacks: the row says so, the report goes on
        return Result(error=describe_error(e))
    finally:
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def release_pairs() -> None:
    _PAIRS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_inputs(spec: LossSpec, device: torch.device) -> list[Tensor]:
    """Student and teacher q and k (B, H, N, head_dim), float32, with attention as peaked as a trained ViT's."""
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (spec.batch, spec.heads, spec.tokens, spec.head_dim)
    tensors = [(torch.randn(shape, generator=g) * 1.5).to(device) for _ in range(4)]
    tensors[0].requires_grad_(True)
    tensors[1].requires_grad_(True)
    return tensors


def measure_loss(spec: LossSpec, isolated: bool = False) -> Result:
    device = torch.device(spec.device)
    fn = LOSS_FORMULATIONS[spec.formulation]
    scale = spec.head_dim ** -0.5
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
# The report
# ---------------------------------------------------------------------------------------------
class Deadline:
    """No measurement starts once ``budget_s`` seconds have passed since the start."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def passed(self) -> bool:
        return self.left() <= 0


SKIPPED = Result(error='not run: time budget spent')


def gib(n: Optional[int]) -> str:
    return 'n/a' if n is None else f"{n / GiB:.2f}"


def mib(n: Optional[int]) -> str:
    return 'n/a' if n is None else f"{n / 2 ** 20:.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a is not None and b else 'n/a'


def step_memory(r: Result) -> Optional[int]:
    """The memory a measurement added to what was allocated before it (bytes), where known."""
    return r.peak - r.before if r.ok and r.peak is not None and r.before is not None else None


def pinned_versions() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        for line in f:
            m = re.match(r'^([A-Za-z0-9_.-]+)==([^\s#]+)', line.strip())
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def machine_lines(args) -> list[str]:
    device = torch.device(args.device)
    lines = [f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
             f"- command: `{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`"]
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {props.name}, {props.total_memory / GiB:.0f} GiB, {props.multi_processor_count} SMs; "
                     f"driver {nvidia_driver()}; CUDA runtime {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version()}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}), torch threads: "
                     f"{torch.get_num_threads()}")
    lines.append(f"- CPU cores available: {len(os.sched_getaffinity(0))}; Python {platform.python_version()}")
    pins = pinned_versions()
    for name, installed in (('torch', torch.__version__), ('timm', timm.__version__)):
        pinned = pins.get(name)
        if pinned is None or installed.split('+')[0] == pinned:
            lines.append(f"- {name} {installed}" + (" (as requirements.txt pins)" if pinned else ''))
        else:
            need = (f"this project is written against timm {pinned} (`pip install timm=={pinned}`); another timm "
                    "may lack attributes of its Attention module that the transfer code calls" if name == 'timm'
                    else f"requirements.txt pins {pinned}; this report runs under the machine's torch")
            lines.append(f"- {name} {installed}: {need}")
    return lines


def nvidia_driver() -> str:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def matmul_rate(device: torch.device, n: int, clock: str = 'wall', repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on ``device`` (the MFU denominator)."""
    now = CLOCKS[clock]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = now()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (now() - start)


@dataclass
class Report:
    args: argparse.Namespace
    header: list[str]
    sections: dict[str, list[str]] = field(default_factory=dict)

    def write(self) -> None:
        lines = ['# GPU report' if torch.device(self.args.device).type == 'cuda' else '# Report (no GPU)', '',
                 *self.header, '']
        for title, body in self.sections.items():
            lines += [f"## {title}", '', *body, '']
        tmp = self.args.output + '.tmp'
        with open(tmp, 'w') as f:
            f.write('\n'.join(lines))
        os.replace(tmp, self.args.output)


def run_tests(args, deadline: Deadline) -> list[str]:
    """tests/test_cuda.py in a child pytest; one row per test."""
    if deadline.passed:
        return ['not run: time budget spent']
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, 'junit.xml')
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml}',
               os.path.join('tests', 'test_cuda.py')]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(30.0, min(args.tests_timeout, deadline.left())))
        except subprocess.TimeoutExpired:
            return [f"`{' '.join(cmd[1:])}` did not finish in time"]
        seconds = time.perf_counter() - start
        if not os.path.exists(xml):
            return [f"pytest wrote no results (exit {proc.returncode}):", '', '```', proc.stdout[-2000:],
                    proc.stderr[-2000:], '```']
        rows = ['| test | outcome | s | detail |', '| --- | --- | ---: | --- |']
        counts: dict[str, int] = {}
        for case in ElementTree.parse(xml).getroot().iter('testcase'):
            outcome, detail = 'passed', ''
            for tag in ('failure', 'error', 'skipped'):
                node = case.find(tag)
                if node is not None:
                    outcome = {'failure': 'FAILED', 'error': 'ERROR', 'skipped': 'skipped'}[tag]
                    detail = (node.get('message') or '').strip().splitlines()[0][:200] if node.get('message') else ''
            counts[outcome] = counts.get(outcome, 0) + 1
            rows.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} | "
                        f"{detail.replace('|', '/')} |")
    summary = ', '.join(f"{n} {k}" for k, n in counts.items()) or 'no tests collected'
    return [f"`python -m pytest tests/test_cuda.py`: {summary} in {seconds:.0f} s (exit {proc.returncode}).", '',
            *rows]


def step_specs(args, model: str, kwargs: tuple, size: int) -> list[StepSpec]:
    base = StepSpec(model=model, kwargs=kwargs, size=size, batch=args.batch_size, task='plain', path='fused',
                    device=args.device, amp=args.amp, end_layer=args.end_layer, drop_path=args.drop_path,
                    warmup=args.warmup, steps=args.steps, clock=args.clock)
    specs = []
    for task in args.tasks:
        paths = ['sdpa_loss', 'chunked_loss'] if task == 'distill' else ['fused']
        for path in paths + ['explicit', 'authors']:
            specs.append(replace(base, task=task, path=path, count_flops=path == 'explicit'))
    return specs


def model_label(model: str, kwargs: tuple) -> str:
    return model + (' (' + ', '.join(f"{k}={v}" for k, v in kwargs) + ')' if kwargs else '')


def step_table(args, results: dict, peak_rate: Optional[float]) -> list[str]:
    mem = 'peak CUDA memory' if torch.device(args.device).type == 'cuda' else 'peak RSS'
    rows = [f"| model | px | N | row | path | ms / step | images / s | {mem} (GiB) | step memory (GiB) | MFU |",
            '| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for (model, kwargs, size), specs in results.items():
        flops = {spec.task: r.flops for spec, r in specs if r.flops}
        n = next((r.tokens for _, r in specs if r.tokens), '')
        for spec, r in specs:
            head = (f"| {model_label(model, kwargs)} | {size} | {n} | {TASK_NAMES[spec.task]} | "
                    f"{PATH_NAMES[spec.path]} |")
            if not r.ok:
                rows.append(f"{head} {r.error} | | | | |")
                continue
            mfu = (f"{flops[spec.task] / r.seconds / peak_rate:.1%}" if peak_rate and spec.task in flops else 'n/a')
            rows.append(f"{head} {r.seconds * 1e3:.1f} | {spec.batch / r.seconds:.1f} | {gib(r.peak)} | "
                        f"{gib(step_memory(r))} | {mfu} |")
    return rows


def run_steps(args, deadline: Deadline, report: Report) -> dict:
    device = torch.device(args.device)
    peak_rate = matmul_rate(device, args.matmul_size, args.clock)
    intro = [f"Batch {args.batch_size}; the copy and distill rows transfer layers [0, depth {args.end_layer}) "
             f"(--end_layer {args.end_layer}; the authors' approach runs the teacher to full depth all the same); "
             f"drop_path {args.drop_path}; autocast {args.amp} except the authors' approach (float32); median of "
             f"{args.steps} steps after {args.warmup} ({CLOCK_NAMES[args.clock]}). A step is forward, losses "
             "(cross-entropy + 3 x the transfer loss), backward and AdamW; the teacher forward runs under no_grad. "
             "Step memory: the peak minus the memory before the steps (CUDA: allocated between steps, i.e. weights, "
             "optimizer state, inputs; CPU: the peak resident set before the first step). "
             "MFU: the model's FLOPs (counted by torch's FlopCounterMode in the explicit row of the same task: "
             "matrix products once, no recomputation, the teacher only as deep as the transfer needs) per second, "
             "over the "
             f"bf16 matrix-product rate measured here ({peak_rate / 1e12:.1f} TFLOP/s, "
             f"{args.matmul_size}^3 products).", '']
    results: dict = {}
    for model, kwargs in args.model_specs:
        for size in args.sizes:
            specs = step_specs(args, model, kwargs, size)
            group = results.setdefault((model, kwargs, size), [])
            for spec in specs:
                r = SKIPPED if deadline.passed else run_measurement(measure_step, spec, args.isolate)
                group.append((spec, r))
                print(f"# {model} {size}px {spec.task} {spec.path}: "
                      + (f"{spec.batch / r.seconds:.1f} img/s, peak {gib(r.peak)} GiB" if r.ok else r.error),
                      flush=True)
            release_pairs()
            report.sections['Step table'] = intro + step_table(args, results, peak_rate)
            report.write()
    return results


def run_loss(args, deadline: Deadline) -> list[str]:
    mem = 'peak CUDA memory' if torch.device(args.device).type == 'cuda' else 'peak RSS'
    rows = [f"Forward and backward of one layer's loss from float32 q, k (batch {args.loss_batch}, "
            f"{args.loss_heads} heads, head_dim {args.loss_head_dim}; gradients for the student's q and k), median "
            f"of {args.steps} after {args.warmup} ({CLOCK_NAMES[args.clock]}). Memory: the peak minus the inputs. "
            "The last column is the value's relative difference from the explicit maps' value.", '',
            f"| N | formulation | ms | x explicit | {mem} above the inputs (MiB) | x explicit | value vs explicit |",
            '| ---: | --- | ---: | ---: | ---: | ---: | ---: |']
    for n in args.loss_tokens:
        results = {}
        for name in LOSS_FORMULATIONS:
            spec = LossSpec(formulation=name, batch=args.loss_batch, heads=args.loss_heads, tokens=n,
                            head_dim=args.loss_head_dim, device=args.device, warmup=args.warmup, steps=args.steps,
                            clock=args.clock)
            results[name] = SKIPPED if deadline.passed else run_measurement(measure_loss, spec, args.isolate)
            r = results[name]
            print(f"# loss N={n} {name}: " + (f"{r.seconds * 1e3:.1f} ms" if r.ok else r.error), flush=True)
        ref = results['explicit maps']
        ref_mem = step_memory(ref)
        for name, r in results.items():
            if not r.ok:
                rows.append(f"| {n} | {name} | {r.error} | | | | |")
                continue
            mem_used = step_memory(r)
            rows.append(f"| {n} | {name} | {r.seconds * 1e3:.1f} | {ratio(r.seconds, ref.seconds if ref.ok else None)} "
                        f"| {mib(mem_used)} | {ratio(mem_used, ref_mem)} | "
                        + (f"{r.value / ref.value - 1:.1e}" if ref.ok and ref.value else 'n/a') + " |")
    return rows


def run_loader(args, deadline: Deadline, steps: dict) -> list[str]:
    from benchmarks.bench_data import LoaderEpochs, recipe_args, write_image_folder
    from util.datasets import build_dataset

    workers = args.workers or len(os.sched_getaffinity(0))
    images = args.loader_images or max(256, 2 * workers * args.batch_size)
    w, h = args.loader_image_size
    rows = [f"The training loader (main_finetune.py's MAE recipe: random-resized crop, flip, RandAugment "
            f"rand-m9-mstd0.5-inc1, random erasing 0.25; reduced-scale JPEG decoding) over {images} generated "
            f"{w} x {h} JPEGs with {workers} workers (all the machine's cores), batch {args.batch_size}, median of "
            f"{args.loader_epochs} epochs after one warm-up epoch; against the distill step (fused, the library's "
            "loss) of the step table's largest model at the same size.", '',
            '| px | loader images / s | distill step images / s | loader / step |', '| ---: | ---: | ---: | ---: |']
    largest_model = args.model_specs[-1]
    with tempfile.TemporaryDirectory() as data:
        write_image_folder(data, images, w, h)
        for size in args.sizes:
            if deadline.passed:
                rows.append(f"| {size} | not run: time budget spent | | |")
                continue
            loader_args = recipe_args(data, size, args.batch_size, True, workers)
            loader = LoaderEpochs(build_dataset(True, loader_args), loader_args)
            loader.rate()
            rate = statistics.median(loader.rate() for _ in range(args.loader_epochs))
            del loader
            step = next((args.batch_size / r.seconds for spec, r in steps.get((*largest_model, size), [])
                         if spec.task == 'distill' and spec.path == 'sdpa_loss' and r.ok), None)
            rows.append(f"| {size} | {rate:.0f} | " + (f"{step:.0f} | {rate / step:.2f} |" if step else
                                                       "not measured | |"))
            print(f"# loader {size}px: {rate:.0f} img/s", flush=True)
    return rows


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python benchmarks/gpu_report.py', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--smoke', action='store_true',
                   help='every part on CPU with a tiny ViT (32 and 64 px), one step each, one thread: checks that the '
                        'script works')
    p.add_argument('--output', default='gpu_report.md', help='the markdown file to write')
    p.add_argument('--parts', nargs='+', default=['tests', 'steps', 'loss', 'loader'],
                   choices=['tests', 'steps', 'loss', 'loader'], help='what to run')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    p.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                   help='autocast of the fused and explicit rows (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--budget_s', type=float, default=450,
                   help='seconds after which no further measurement starts (the rest is marked not run)')
    p.add_argument('--clock', default='wall', choices=list(CLOCKS),
                   help='what a measurement times: wall-clock seconds, or (CPU only) this process\'s CPU seconds, '
                        'steadier on a machine shared with other work (with one thread: OMP_NUM_THREADS=1)')
    p.add_argument('--isolate', action='store_true',
                   help='each measurement in its own process, so that its peak memory is its own (on CPU: the '
                        'peak RSS, under glibc\'s MALLOC_MMAP_THRESHOLD_=65536; without it CPU memory is n/a)')
    g = p.add_argument_group('tests')
    g.add_argument('--tests_timeout', type=float, default=240, help='seconds for pytest tests/test_cuda.py')
    g = p.add_argument_group('step table')
    g.add_argument('--models', nargs='+', default=['vit_base_patch16_224', 'vit_large_patch16_224'],
                   help='timm ViT names (teacher and student of one architecture)')
    g.add_argument('--model_kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='timm architecture arguments for every model, e.g. patch_size=4 embed_dim=64 depth=4')
    g.add_argument('--sizes', nargs='+', type=int, default=[224, 448], help='input sizes in pixels')
    g.add_argument('--batch_size', type=int, default=32, help='images per step')
    g.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS, help='rows of the step table')
    g.add_argument('--end_layer', type=int, default=-3,
                   help='transfer layers [0, depth + end_layer) (-3: what the authors\' released code does)')
    g.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth of the student')
    g.add_argument('--warmup', type=int, default=2, help='untimed calls before each measurement')
    g.add_argument('--steps', type=int, default=5, help='timed calls per measurement (median reported)')
    g.add_argument('--matmul_size', type=int, default=None,
                   help='side of the bf16 matrix product timed for MFU (default: 8192 on CUDA, 1024 on CPU)')
    g = p.add_argument_group('the distillation loss alone')
    g.add_argument('--loss_tokens', nargs='+', type=int, default=[197, 785, 1765], help='token counts N')
    g.add_argument('--loss_batch', type=int, default=32, help='batch')
    g.add_argument('--loss_heads', type=int, default=16, help='heads (ViT-L: 16)')
    g.add_argument('--loss_head_dim', type=int, default=64, help='head dimension (ViT-L: 64)')
    g = p.add_argument_group('loader against step')
    g.add_argument('--workers', type=int, default=0, help='loader workers (0: one per available core)')
    g.add_argument('--loader_images', type=int, default=0,
                   help='generated JPEGs (0: 2 batches per worker, at least 256)')
    g.add_argument('--loader_image_size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'),
                   help='size of the generated JPEGs (ImageNet-like)')
    g.add_argument('--loader_epochs', type=int, default=2, help='timed loader epochs (median)')
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.sizes, args.batch_size = 'cpu', ['vit_base_patch16_224'], [32, 64], 2
        args.warmup, args.steps, args.matmul_size = 0, 1, 128
        args.loss_tokens, args.loss_batch, args.loss_heads, args.loss_head_dim = [17, 65], 2, 3, 16
        args.workers, args.loader_images, args.loader_image_size, args.loader_epochs = 1, 8, [80, 60], 1
        args.model_specs = [(m, tuple(SMOKE_KWARGS.items())) for m in args.models]
    else:
        args.model_specs = [(m, tuple(parse_kwargs(args.model_kwargs, '--model_kwargs').items())) for m in args.models]
    if args.amp is None:
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device.startswith('cuda') else 1024
    if args.clock == 'process' and args.device.startswith('cuda'):
        p.error('--clock process: CUDA kernels run asynchronously, off this process\'s CPU time; use --clock wall')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is visible; use --smoke (or --device cpu) on a machine without GPU')
    return args


def main(args) -> Report:
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: more threads would only contend with each other
    if args.isolate and not args.device.startswith('cuda'):
        os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')  # read by each child's glibc at start
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = True  # as main_finetune.py
    deadline = Deadline(args.budget_s)
    report = Report(args, machine_lines(args))
    report.write()
    steps: dict = {}
    if 'tests' in args.parts:
        report.sections['CUDA tests'] = run_tests(args, deadline)
        report.write()
    if 'steps' in args.parts:
        steps = run_steps(args, deadline, report)
    if 'loss' in args.parts:
        report.sections['The distillation loss alone'] = run_loss(args, deadline)
        report.write()
    if 'loader' in args.parts:
        report.sections['Loader against step'] = run_loader(args, deadline, steps)
        report.write()
    print(f"\nwrote {args.output}", flush=True)
    return report


if __name__ == '__main__':
    main(get_args())
