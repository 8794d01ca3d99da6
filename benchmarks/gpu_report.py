"""Everything a GPU must show, in one command that writes its tables to one markdown file.

On one NVIDIA GPU, in under 8 minutes (``--budget_s``: no measurement starts after it; the file is rewritten
after every part, so an interrupted run leaves the tables it finished):

1. CUDA tests: ``python -m pytest tests/test_cuda.py`` in a child process (bf16 autocast against float32 in
   every transfer mode, fused against explicit, the distillation loss under autocast, a DDP step under
   torchrun, a checkpoint and an exact resume on CUDA); the report holds pytest's own lines, one per test,
   and its summary.
2. Step table (benchmarks/bench_step.py): ViT-B/16 and ViT-L/16 pairs, 224 and 448 px, batch 32: a plain
   student step, the teacher's forward, a copy step and a distill step, each through the library's fused
   path, its explicit path and the authors' approach (benchmarks/baseline.py): images/s, peak memory
   (``torch.cuda.max_memory_allocated``) and MFU against a bf16 matrix-multiply rate measured in the same run.
3. The distillation loss alone (forward and backward) at N = 197, 785 and 1765 tokens with ViT-L's heads:
   the library's formulation, its explicit maps, the authors'; time and memory.
4. Loader against step: the training loader's images/s (MAE recipe transforms, workers on all the
   machine's cores, generated ImageNet-like JPEGs) against the largest model's distill step.
5. Teacher held in bf16: the largest model's distill step with the teacher's weights in float32 and in bf16
   (--teacher_dtype): speed, peak memory, the teacher's parameter bytes.

    python benchmarks/gpu_report.py                    # on a GPU machine: writes gpu_report.md
    python benchmarks/gpu_report.py --smoke            # every part on CPU, tiny model, one step each (CI)

It needs only the project's requirements and runs under the torch a GPU machine already has; the
report states the versions and what requirements.txt pins.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402

from benchmarks import bench_step  # noqa: E402
from benchmarks.bench_step import Deadline  # noqa: E402
from util.args import HelpFormatter  # noqa: E402
from util.config import Config  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

GiB = 2 ** 30
PARTS = ('tests', 'steps', 'loss', 'loader', 'teacher')
# The tiny ViT of --smoke: 32 px / patch 8 (17 tokens), and 64 px (65 tokens).
SMOKE_KWARGS = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)
TEST_FILE = 'tests/test_cuda.py'


def check_output(path: str) -> None:
    """Create the folder of the report file ``path`` where it is missing; a place the report cannot be
    written is a UserError, raised before any measurement."""
    if os.path.isdir(path):
        raise UserError(f"--output {path}: is a folder; give the report's file name, e.g. "
                        f"--output {os.path.join(path, 'gpu_report.md')}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output {path}: {existing} is a file, not a folder; give a path in a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {path}: cannot create the folder {folder} ({e.strerror or e}); give a writable "
                        "path with --output") from None
    probe = path + '.tmp'
    try:
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output {path}: cannot write in {folder} ({e.strerror or e}); give a writable path "
                        "with --output") from None


def pinned_versions() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        for line in f:
            m = re.match(r'^([A-Za-z0-9_.-]+)==([^\s#]+)', line.strip())
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def nvidia_driver() -> str:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


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


def _text(out) -> str:
    return out.decode(errors='replace') if isinstance(out, bytes) else (out or '')


def run_tests(args, deadline: Deadline) -> list[str]:
    """tests/test_cuda.py through plain pytest in a child process: its command, exit status and summary
    line, then its own output (one line per test with its outcome, one line per failure)."""
    if deadline.passed:
        return ['not run: time budget spent']
    options = ['-v', '-rfEs', '--tb=line', '-p', 'no:cacheprovider']
    shown = f"python -m pytest {' '.join(options)} {TEST_FILE}"
    timeout = max(30.0, min(args.tests_timeout, deadline.left()))
    try:
        proc = subprocess.run([sys.executable, '-m', 'pytest', *options, TEST_FILE], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = _text(e.stdout).strip().splitlines()[-200:]
        return [f"`{shown}` did not finish in {timeout:.0f} s; its output so far:", '', '```', *tail, '```']
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1].strip('= ') if lines else 'no output'
    body = [f"`{shown}` (exit {proc.returncode}): {summary}.", '', '```', *lines[-400:], '```']
    if proc.returncode not in (0, 5) and proc.stderr.strip():
        body += ['', 'stderr:', '', '```', *proc.stderr.strip().splitlines()[-50:], '```']
    return body


def run_loader(args, deadline: Deadline, steps: dict) -> list[str]:
    from benchmarks.bench_data import LoaderEpochs, recipe_args, write_image_folder
    from util.datasets import build_dataset

    workers = args.workers or len(os.sched_getaffinity(0))
    images = args.loader_images or max(256, 2 * workers * args.batch_size)
    w, h = args.loader_image_size
    rows = [f"The training loader (main_finetune.py's MAE recipe: random-resized crop, flip, RandAugment "
            f"rand-m9-mstd0.5-inc1, random erasing 0.25; reduced-scale JPEG decoding) over {images} generated "
            f"{w} x {h} JPEGs with {workers} workers (all the machine's cores), batch {args.batch_size}, median of "
            f"{args.loader_epochs} epochs after one warm-up epoch; against the distill step (fused) of the step "
            "table's largest model at the same size.", '',
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
                         if spec.task == 'distill' and spec.path == 'fused' and r.ok), None)
            rows.append(f"| {size} | {rate:.0f} | " + (f"{step:.0f} | {rate / step:.2f} |" if step else
                                                       "not measured | |"))
            print(f"# loader {size}px: {rate:.0f} img/s", flush=True)
    return rows


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python benchmarks/gpu_report.py', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--smoke', action='store_true',
                   help='every part on CPU with a tiny ViT (32 and 64 px), one step each, one thread: checks that the '
                        'script works')
    p.add_argument('--output', default='gpu_report.md',
                   help='the markdown file to write (its folder is created where missing)')
    p.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS, help='what to run')
    p.add_argument('--budget_s', type=float, default=450,
                   help='seconds after which no further measurement starts (the rest is marked not run)')
    bench_step.add_args(p, models=['vit_base_patch16_224', 'vit_large_patch16_224'], sizes=[224, 448],
                        batch_size=32)
    g = p.add_argument_group('tests')
    g.add_argument('--tests_timeout', type=float, default=240, help=f'seconds for pytest {TEST_FILE}')
    g = p.add_argument_group('loader against step')
    g.add_argument('--workers', type=int, default=0, help='loader workers (0: one per available core)')
    g.add_argument('--loader_images', type=int, default=0,
                   help='generated JPEGs (0: 2 batches per worker, at least 256)')
    g.add_argument('--loader_image_size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'),
                   help='size of the generated JPEGs (ImageNet-like)')
    g.add_argument('--loader_epochs', type=int, default=2, help='timed loader epochs (median)')
    args = p.parse_args(argv)
    if not args.smoke:
        return bench_step.resolve_args(p, args)
    smoke = dict(device='cpu', models=['vit_base_patch16_224'], sizes=[32, 64], batch_size=2, warmup=0, steps=1,
                 matmul_size=128, loss_tokens=[17, 65], loss_batch=2, loss_heads=3, loss_head_dim=16, workers=1,
                 loader_images=8, loader_image_size=[80, 60], loader_epochs=1)
    return bench_step.resolve_args(p, Config.of(args, **smoke), SMOKE_KWARGS)


def main(args) -> Report:
    check_output(args.output)
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
        def show(results: dict, peak_rate) -> None:
            report.sections['Step table'] = (bench_step.step_intro(args, peak_rate)
                                             + bench_step.step_table(args, results, peak_rate))
            report.write()
        steps, _ = bench_step.run_steps(args, deadline, show)
    if 'loss' in args.parts:
        report.sections['The distillation loss alone'] = bench_step.run_loss(args, deadline)
        report.write()
    if 'loader' in args.parts:
        report.sections['Loader against step'] = run_loader(args, deadline, steps)
        report.write()
    if 'teacher' in args.parts:
        report.sections['Teacher held in bf16'] = bench_step.run_teacher_dtype(args, deadline)
        report.write()
    print(f"\nwrote {args.output}", flush=True)
    return report


if __name__ == '__main__':
    run_cli(lambda: main(get_args()))
