"""The embedded default: both papers' claims on real images, on a CPU, in minutes.

    python demo.py            # 3 seeds; estimated 19 minutes on 2 idle CPU cores (see README)
    python demo.py --quick    # 1 seed, a shorter probe budget, about 4 minutes

Data: the 1,797 handwritten digits that ship inside scikit-learn (8x8, 16 grey levels), upsampled to
32x32 RGB and written once as ImageFolders under --output_dir with fixed, seeded splits: a
pre-training split, a small labelled split (10 images per class), a held-out test split, and a
"wild" set of held-out digits (labels hidden) mixed with twice as many distractors that are not digits
(noise, textures, crops of scikit-learn's sample photographs, shapes).

Part 1, attention transfer (Li et al., NeurIPS 2024): a teacher ViT is trained on the pre-training
split; a student is trained from random initialisation on the small split four ways (from scratch,
attention copy, attention distillation, fine-tuning the teacher) and evaluated on the test split.
Part 2, Attention Probe (Wang et al., ICASSP 2022): wild images are selected with the teacher by
attention probe and at random (same number); a smaller student is distilled on each, without labels,
and evaluated on the test split. As in the reference, teacher and probe students classify from the
class token, the 32x32 test images are evaluated as they are (no resize and crop), and the students'
budget is a fixed number of image presentations (PROBE_PRESENTATIONS; epochs = int(presentations /
selected images) - 1) with the lr stepped down x0.1 at 80% of the epochs (the reference: 200 of 251).

Everything runs through the project's own scripts (main_finetune.py, select_wild_data.py,
tools/visualize_attention.py); each run's full log is kept under --output_dir/runs/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

import main_finetune
import select_wild_data
from modes import probe_epochs
from tools import visualize_attention
from util.errors import run_cli

SIZE = 32
# Teacher and student architecture (timm vit_base_patch16_224 with these arguments): 64 patches of 4x4.
ARCH = ['patch_size=4', 'embed_dim=64', 'depth=4', 'num_heads=4', 'mlp_ratio=2']
# The smaller probe student: half the width, half the heads, same token grid.
PROBE_STUDENT = ['patch_size=4', 'embed_dim=32', 'depth=4', 'num_heads=2', 'mlp_ratio=2']
# The probe students' budget in image presentations (the reference's rule, scaled down: it uses
# 320,000 x 512); 80,000 = 199 epochs of the 400 selected images. --quick: 32,000 (79 epochs).
PROBE_PRESENTATIONS = {'full': 80000, 'quick': 32000}
COMMON = ['--model', 'vit_base_patch16_224', '--input_size', str(SIZE), '--nb_classes', '10', '--device', 'cpu',
          '--num_workers', '0', '--aa', 'none', '--reprob', '0', '--min_crop_scale', '0.6', '--hflip', '0',
          '--drop_path', '0.0', '--print_freq', '1000', '--save_every', '0', '--checkpoint_minutes', '0']


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit (0..16) as a 32x32 RGB image, white on black."""
    grey = (pixels.reshape(8, 8) / 16.0 * 255).astype(np.uint8)
    return Image.fromarray(grey).resize((SIZE, SIZE), Image.BILINEAR).convert('RGB')


def distractors(count: int, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """Images that are not digits: noise, textures, crops of sklearn's sample photos, shapes."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    out = []
    for i in range(count):
        kind = ('noise', 'texture', 'photo', 'shape')[i % 4]
        if kind == 'noise':
            img = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        elif kind == 'texture':
            y, x = np.mgrid[0:SIZE, 0:SIZE]
            freq, angle = rng.uniform(0.2, 1.2), rng.uniform(0, np.pi)
            wave = np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 6.3))
            img = Image.fromarray(np.repeat(((wave + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=2))
        elif kind == 'photo':
            photo = photos[i % len(photos)]
            side = int(rng.integers(24, 96))
            y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
            img = Image.fromarray(photo[y:y + side, x:x + side]).resize((SIZE, SIZE), Image.BILINEAR)
        else:
            img = Image.new('RGB', (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 4))):
                box = sorted(rng.integers(0, SIZE, 2).tolist()) + sorted(rng.integers(0, SIZE, 2).tolist())
                box = [box[0], box[2], box[1] + 2, box[3] + 2]
                colour = tuple(int(v) for v in rng.integers(120, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append((kind, img))
    return out


def prepare_data(root: str) -> dict:
    """Write the splits once (split seed 0); returns their paths and the wild set's composition."""
    marker = os.path.join(root, 'splits.json')
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    split = {}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        split.update({int(i): 'small' for i in idx[:10]})
        split.update({int(i): 'test' for i in idx[10:50]})
        split.update({int(i): 'wild' for i in idx[50:90]})
        split.update({int(i): 'pretrain' for i in idx[90:]})
    if os.path.isdir(root):
        shutil.rmtree(root)

    def write(folder: str, i: int) -> None:
        os.makedirs(folder, exist_ok=True)
        digit_image(digits.images[i]).save(os.path.join(folder, f'{i:04d}.png'))

    for i, part in split.items():
        label = str(digits.target[i])
        if part in ('pretrain', 'small'):
            write(os.path.join(root, part, 'train', label), i)
        elif part == 'test':
            for dataset in ('pretrain', 'small'):
                write(os.path.join(root, dataset, 'val', label), i)
    wild = os.path.join(root, 'wild')
    os.makedirs(wild)
    members = {}
    wild_digits = [i for i, part in split.items() if part == 'wild']
    names = rng.permutation(len(wild_digits) * 3)  # shuffled names: nothing in a file name tells what it is
    for k, i in enumerate(wild_digits):
        name = f'img_{names[k]:05d}.png'
        digit_image(digits.images[i]).save(os.path.join(wild, name))
        members[name] = 'digit'
    for k, (kind, img) in enumerate(distractors(2 * len(wild_digits), rng), start=len(wild_digits)):
        name = f'img_{names[k]:05d}.png'
        img.save(os.path.join(wild, name))
        members[name] = kind
    info = {'root': root, 'counts': {p: sum(v == p for v in split.values()) for p in set(split.values())},
            'wild_members': members}
    with open(marker, 'w') as f:
        json.dump(info, f)
    return info


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
class Runner:
    """Runs the project's scripts in this process, each with its full log in runs/<name>.log."""

    def __init__(self, out: str, total: int) -> None:
        self.out, self.total, self.done = out, total, 0
        self.start = time.time()
        os.makedirs(os.path.join(out, 'runs'), exist_ok=True)

    def __call__(self, name: str, fn, *args):
        self.done += 1
        print(f"[{self.done:2d}/{self.total}] {name} ...", end=' ', flush=True)
        t0 = time.time()
        with open(os.path.join(self.out, 'runs', f'{name}.log'), 'w') as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = fn(*args)
        seconds = time.time() - t0
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{seconds:5.0f} s  (elapsed {elapsed / 60:4.1f} min, eta {eta / 60:4.1f} min)", flush=True)
        return result, seconds


def train(run: Runner, name: str, argv: list[str]) -> tuple[dict, float, str]:
    path = os.path.join(run.out, 'runs', name)
    stats, seconds = run(name, main_finetune.run, COMMON + ['--output_dir', path, '--log_dir', path] + argv)
    return stats, seconds, path


def seed_runs(run: Runner, data: str, seed: int, epochs: dict, presentations: int) -> dict:
    """Both parts for one seed; returns {method: (accuracy, seconds, run folder)} and selection facts."""
    s = ['--seed', str(seed)]
    results = {}
    teacher_stats, sec, teacher_dir = train(run, f'seed{seed}_teacher', s + [
        '--data_path', os.path.join(data, 'pretrain'), '--model_kwargs', *ARCH, '--batch_size', '64',
        '--epochs', str(epochs['teacher']), '--lr', '2e-3', '--warmup_epochs', '5', '--layer_decay', '1',
        '--eval_every', '10', '--cls_token'])
    results['teacher (pre-training split)'] = (teacher_stats['test_acc1'], sec, teacher_dir)
    teacher = os.path.join(teacher_dir, 'checkpoint.pth')

    small = ['--data_path', os.path.join(data, 'small'), '--model_kwargs', *ARCH, '--batch_size', '32',
             '--epochs', str(epochs['student']), '--lr', '1e-3', '--warmup_epochs', '10', '--eval_every', '10']
    methods = {
        'from scratch': ('scratch', ['--layer_decay', '1']),
        'attention copy': ('copy', ['--mode', 'copy', '--finetune', teacher, '--layer_decay', '0.75']),
        'attention distillation': ('distill', ['--mode', 'distill', '--finetune', teacher, '--end_layer', '-1',
                                               '--atd_weight', '3', '--layer_decay', '1']),
        'fine-tuning the teacher': ('finetune', ['--finetune', teacher, '--layer_decay', '0.75', '--cls_token']),
    }
    for method, (short, extra) in methods.items():
        stats, sec, path = train(run, f'seed{seed}_{short}', s + small + extra)
        results[method] = (stats['test_acc1'], sec, path)

    selections = {}
    n_probe_epochs = probe_epochs(400, presentations)
    for kind in ('probe', 'random'):
        output = os.path.join(run.out, 'runs', f'seed{seed}_selection_{kind}.pth')
        args = select_wild_data.get_args_parser().parse_args(
            ['--teacher', teacher, '--wild_path', os.path.join(data, 'wild'), '--output', output,
             '--num_select', '400', '--batch_size', '100', '--num_workers', '0', '--device', 'cpu',
             '--seed', str(seed)] + (['--random'] if kind == 'random' else []))
        selection, sec = run(f'seed{seed}_select_{kind}', select_wild_data.main, args)
        selections[kind] = selection
        stats, sec2, path = train(run, f'seed{seed}_probe_student_{kind}', s + [
            '--mode', 'probe', '--finetune', teacher, '--selection', output,
            '--eval_data_path', os.path.join(data, 'small'), '--student_model', 'vit_base_patch16_224',
            '--student_kwargs', *PROBE_STUDENT, '--batch_size', '64', '--presentations', str(presentations),
            '--step_epochs', str(n_probe_epochs * 4 // 5 + 1), '--eval_every', '20', '--cls_token'])
        label = 'probe distillation, attention-probe selection' if kind == 'probe' else \
            'probe distillation, random selection'
        results[label] = (stats['test_acc1'], sec + sec2, path)
    return results, selections


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def digit_fraction(selection: dict, members: dict) -> float:
    chosen = [selection['paths'][i] for i in selection['selected'].tolist()]
    return 100.0 * sum(members[os.path.basename(p)] == 'digit' for p in chosen) / len(chosen)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else \
        f"{values[0]:.1f}"


def claims(acc: dict[str, list[float]]) -> list[str]:
    m = {k: statistics.mean(v) for k, v in acc.items()}
    scratch, copy, distill, finetune = (m['from scratch'], m['attention copy'], m['attention distillation'],
                                        m['fine-tuning the teacher'])
    probe, rand = (m['probe distillation, attention-probe selection'], m['probe distillation, random selection'])
    verdict = lambda ok: 'reproduced' if ok else 'NOT reproduced'  # noqa: E731
    return [
        f"- from scratch below copy and distillation: {verdict(scratch < copy and scratch < distill)} "
        f"(scratch {scratch:.1f}, copy {copy:.1f}, distill {distill:.1f})",
        f"- distillation close to fine-tuning (within 3 points): {verdict(abs(distill - finetune) <= 3.0)} "
        f"(distill {distill:.1f}, fine-tune {finetune:.1f})",
        f"- attention-probe selection beats random selection: {verdict(probe > rand)} "
        f"(probe {probe:.1f}, random {rand:.1f})",
    ]


def plot_accuracy(runs: dict[str, str], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, folder in runs.items():
        with open(os.path.join(folder, 'log.txt')) as f:
            entries = [json.loads(line) for line in f if 'test_acc1' in line]
        ax.plot([e['epoch'] + 1 for e in entries], [e['test_acc1'] for e in entries], marker='o', label=method)
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('digits test split, seed 0')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output_dir', default='demo_output', help='where data, runs, table and figures go')
    p.add_argument('--seeds', default=3, type=int, help='seeds per method (mean and standard deviation)')
    p.add_argument('--quick', action='store_true', help='one seed and a shorter probe budget (about 5 minutes on '
                   '2 CPU cores)')
    a = p.parse_args(argv)
    seeds = 1 if a.quick else a.seeds
    epochs = {'teacher': 40, 'student': 100}
    presentations = PROBE_PRESENTATIONS['quick' if a.quick else 'full']
    out = a.output_dir
    t0 = time.time()
    print(f"writing the digits data set under {out}/data ...", flush=True)
    info = prepare_data(os.path.join(out, 'data'))
    print(f"  splits: {info['counts']}; wild set: 400 held-out digits + 800 distractors", flush=True)
    run = Runner(out, total=seeds * 9)
    per_method: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    fractions = {'probe': [], 'random': []}
    first = None
    for seed in range(seeds):
        results, selections = seed_runs(run, os.path.join(out, 'data'), seed, epochs, presentations)
        first = first or results
        for method, (acc, sec, _) in results.items():
            per_method.setdefault(method, []).append(acc)
            seconds.setdefault(method, []).append(sec)
        for kind in fractions:
            fractions[kind].append(digit_fraction(selections[kind], info['wild_members']))

    lines = [f"| method | test accuracy (%), {seeds} seed{'s' if seeds > 1 else ''} | wall time per run (s) | "
             "digits in the selected wild images (%) |", "| --- | ---: | ---: | ---: |"]
    for method, values in per_method.items():
        kind = 'probe' if 'attention-probe' in method else 'random' if 'random' in method else None
        frac = mean_std(fractions[kind]) if kind else ''
        lines.append(f"| {method} | {mean_std(values)} | {statistics.mean(seconds[method]):.0f} | {frac} |")
    verdicts = claims(per_method)
    n_probe = probe_epochs(400, presentations)
    budget = (f"Probe students: {presentations} image presentations = {n_probe} epochs of the 400 selected images "
              f"(batch 64), lr x0.1 from epoch {n_probe * 4 // 5 + 1} (counted from 1).")
    report = '\n'.join(lines + ['', budget, '', 'Claims:'] + verdicts +
                       ['', f"Total wall time: {(time.time() - t0) / 60:.1f} min on {os.cpu_count()} CPU cores."])

    figures = {}
    distill_ckpt = os.path.join(first['attention distillation'][2], 'checkpoint.pth')
    with open(os.path.join(out, 'runs', 'attention_figures.log'), 'w') as log, contextlib.redirect_stdout(log):
        visualize_attention.main(['--checkpoint', distill_ckpt, '--data_path', os.path.join(out, 'data', 'small'),
                                  '--output_dir', os.path.join(out, 'attention'), '--num_show', '3',
                                  '--num_images', '400', '--batch_size', '50', '--num_workers', '0'])
    for k in range(3):
        figures[f'attention_{k}'] = os.path.join(out, f'attention_teacher_vs_student_{k}.png')
        shutil.copy(os.path.join(out, 'attention', f'cls_attention_{k}.png'), figures[f'attention_{k}'])
    figures['attention_metrics'] = os.path.join(out, 'attention_metrics.png')
    shutil.copy(os.path.join(out, 'attention', 'attention_metrics.png'), figures['attention_metrics'])
    figures['accuracy'] = os.path.join(out, 'accuracy_per_epoch.png')
    plot_accuracy({m: r[2] for m, r in first.items()}, figures['accuracy'])

    with open(os.path.join(out, 'results.md'), 'w') as f:
        seeds_flag = f' --seeds {a.seeds}' if not a.quick and a.seeds != 3 else ''
        f.write(f"Command: python demo.py{' --quick' if a.quick else ''}{seeds_flag}\n\n{report}\n")
    print('\n' + report)
    print(f"\nresults: {out}/results.md; figures: " + ', '.join(os.path.basename(v) for v in figures.values()))
    return {'accuracy': per_method, 'fractions': fractions, 'figures': figures, 'claims': verdicts}


if __name__ == '__main__':
    sys.exit(0 if run_cli(main) else 1)
