"""Teacher vs student attention: per-image maps, and per-layer agreement over a validation set.

    python tools/visualize_attention.py --checkpoint output_dir/checkpoint.pth --data_path $DATA \\
        --output_dir output_dir/attention

Writes to --output_dir:
  cls_attention_<k>.png       per image: the class token's attention over the image, per layer (rows) and
                              head (columns), teacher on the left, student on the right
  token_maps_<k>_layer<l>.png per image and chosen layer: the full token-by-token maps of both models
  attention_metrics.csv/.png  per layer over the validation images: teacher-student cross-entropy
                              CE(T, S) and Jensen-Shannon divergence, attention entropy and mean attention
                              distance (pixels, over patch tokens) of each model

The teacher comes from the checkpoint (copy modes), --teacher, or the run's --finetune file. Where
teacher and student have different numbers of heads (probe students), the comparison uses the maps
averaged over heads. Every map is the one the model attends with at evaluation. A distilled (or
probe) student runs alone: where transfer took hold, CE approaches the teacher's entropy and JSD
nears 0; a layer whose JSD stays high is where it failed. A copy-mode student runs beside its
teacher and, in the transferred layers, attends with what the teacher hands over: with --mode copy
its maps there are the teacher's (JSD 0 by construction), with copy_q / copy_k they are made of the
teacher's q (k) and its own k (q). The CSV's student_map column and the printed lines say, per layer,
whose maps the student used.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from engine_finetune import fix_evaluation_maps  # noqa: E402
from models_attention import forward_with_capture  # noqa: E402
from models_dual_vit import forward_dual_with_capture  # noqa: E402
from modes import get_mode  # noqa: E402
from util.args import HelpFormatter  # noqa: E402
from util.checkpoint import holds_teacher, recorded_args, restore_weights  # noqa: E402
from util.datasets import collate_skipping_bad, eval_transform, image_folder  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.model_record import recorded_spec  # noqa: E402
from util.output import check_writable  # noqa: E402
from util.pretrained import is_named, load_pretrained_weights, read_checkpoint  # noqa: E402

METRICS = ('teacher_student_ce', 'jsd', 'teacher_entropy', 'student_entropy', 'teacher_distance_px',
           'student_distance_px')
# The student's map in a transferred layer of a copy mode, by what the teacher hands over.
COPIED_MAP = {'attn': "teacher's (copied)", 'q': "teacher's q with own k", 'k': "own q with teacher's k",
              'v': "own (teacher's v)"}


# ---------------------------------------------------------------------------------------------
# Metrics on attention probabilities (B, H, N, N); each is a sum over rows, to be averaged later
# ---------------------------------------------------------------------------------------------
def row_cross_entropy(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return -(t * s.clamp_min(1e-30).log()).sum(-1)


def row_entropy(a: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(a, a).sum(-1)


def row_jsd(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (t + s)
    return 0.5 * (torch.special.xlogy(t, t) - torch.special.xlogy(t, m)).sum(-1) + \
        0.5 * (torch.special.xlogy(s, s) - torch.special.xlogy(s, m)).sum(-1)


def patch_distances(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Pixel distances between patch centres, (P, P)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')
    centres = torch.stack([rows.flatten(), cols.flatten()], 1).float() * patch
    return torch.cdist(centres, centres)


def row_distance(a: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean attention distance of each patch query over patch keys (weights renormalised over patches)."""
    patches = a[..., prefix:, prefix:]
    weights = patches / patches.sum(-1, keepdim=True).clamp_min(1e-30)
    return (weights * distances).sum(-1)


def comparable(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps with matching head counts: as they are, or both averaged over heads."""
    if t.shape[1] == s.shape[1]:
        return t, s
    return t.mean(1, keepdim=True), s.mean(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def load_models(checkpoint: str, teacher_path: str | None):
    """(teacher or None, student, the model's description, the run's model) in eval mode, rebuilt from the model
    the checkpoint records (util.model_record)."""
    ckpt = read_checkpoint(checkpoint, flag='--checkpoint')
    spec = recorded_spec(ckpt)
    if spec is None:
        raise UserError(f"--checkpoint {checkpoint}: it does not record its model (not written by main_finetune.py); "
                        "give a checkpoint.pth of a main_finetune.py run")
    saved = recorded_args(ckpt)
    finetune, mode = teacher_path or saved.get('finetune') or '', get_mode(spec.mode)
    if not mode.uses_teacher and teacher_path:
        raise UserError("a plain run has no teacher to compare with; give a checkpoint of a transfer or probe run")
    teacher_file = is_named(finetune) or os.path.isfile(finetune)  # a name comes from its cache
    if mode.uses_teacher and not holds_teacher(ckpt) and not teacher_file:
        raise UserError(f"the teacher's weights are not in {checkpoint} and {finetune!r} does not exist: give "
                        "--teacher PATH")
    model = mode.build_model(spec)
    if model.teacher is not None and not holds_teacher(ckpt):
        load_pretrained_weights(model.teacher, finetune, use_ema=saved.get('use_teacher_ema', False),
                                flag='--teacher')
    restore_weights(ckpt, checkpoint, model, None)
    teacher = model.teacher.eval() if model.teacher is not None else None
    return teacher, model.student.eval(), spec, model.eval()


@torch.no_grad()
def maps_of(vit, images: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    return forward_with_capture(vit, images, attention_blocks=layers)[1]


def copies(model) -> bool:
    """Whether the student attends with what the teacher hands over (copy modes), so runs beside it."""
    return bool(getattr(model, 'needs_teacher_at_eval', False))


@torch.no_grad()
def maps_used(model, teacher, student, images: torch.Tensor, layers: list[int]) -> dict[str, dict]:
    """The maps each model attends with at evaluation: a copy-mode student's from the dual forward, any
    other model's from running it alone."""
    if copies(model):
        _, t_maps, s_maps = forward_dual_with_capture(model, images, layers)
        return {'teacher': t_maps, 'student': s_maps}
    maps = {'teacher': maps_of(teacher, images, layers)} if teacher is not None else {}
    return {**maps, 'student': maps_of(student, images, layers)}


def student_map_sources(model, layers: list[int]) -> dict[int, str]:
    """Per layer, whose attention map the student uses."""
    copied = model.layers if copies(model) else []
    return {layer: COPIED_MAP[model.mode.exposes] if layer in copied else 'own' for layer in layers}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _grid(vit) -> tuple[int, int]:
    return tuple(vit.patch_embed.grid_size)


def plot_cls_attention(image: torch.Tensor, maps: dict[str, dict[int, torch.Tensor]], models: dict, heads: int,
                       path: str, sources: dict[int, str] | None = None) -> None:
    names = list(maps)
    layers = sorted(next(iter(maps.values())))
    columns = [(name, h) for name in names for h in range(min(heads, maps[name][layers[0]].shape[1]))]
    fig, axes = plt.subplots(len(layers), len(columns) + 1, figsize=(1.3 * (len(columns) + 1), 1.3 * len(layers)),
                             squeeze=False)
    shown = (image - image.min()) / (image.max() - image.min() + 1e-8)
    rows = {(layer, name, head): maps[name][layer][0, head, 0, models[name].num_prefix_tokens:]
            .reshape(_grid(models[name])) for layer in layers for name, head in columns}
    scale = one_scale(rows.values())
    for r, layer in enumerate(layers):
        axes[r, 0].imshow(shown.permute(1, 2, 0).numpy())
        copied = sources and sources.get(layer, 'own') != 'own'
        axes[r, 0].set_ylabel(f'layer {layer}' + (f'\nstudent: {sources[layer]}' if copied else ''), fontsize=7)
        for c, (name, head) in enumerate(columns, start=1):
            image_ = axes[r, c].imshow(rows[layer, name, head].numpy(), cmap='viridis', **scale)
            if r == 0:
                axes[r, c].set_title(f'{name} h{head}', fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.colorbar(image_, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label='attention of the class token')
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_token_maps(maps: dict[str, dict[int, torch.Tensor]], layer: int, heads: int, path: str,
                    source: str = 'own') -> None:
    names = list(maps)
    n_heads = max(min(heads, maps[n][layer].shape[1]) for n in names)
    fig, axes = plt.subplots(len(names), n_heads, figsize=(2.2 * n_heads, 2.2 * len(names)), squeeze=False)
    scale = one_scale(maps[n][layer][0, h] for n in names for h in range(min(heads, maps[n][layer].shape[1])))
    image_ = None
    for r, name in enumerate(names):
        for h in range(n_heads):
            ax = axes[r, h]
            if h < maps[name][layer].shape[1]:
                image_ = ax.imshow(maps[name][layer][0, h].numpy(), cmap='magma', **scale)
                note = f' ({source})' if name == 'student' and source != 'own' else ''
                ax.set_title(f'{name} layer {layer} head {h}{note}', fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.colorbar(image_, ax=axes.ravel().tolist(), shrink=0.8, label='attention weight')
    fig.savefig(path, dpi=110)
    plt.close(fig)


def one_scale(maps) -> dict:
    """One colour scale for every map of a figure (vmin, vmax over all of them): a near-uniform map then looks
    near-uniform, instead of stretched to the full colour range as a map scaled on its own is."""
    maps = list(maps)
    return {'vmin': float(min(m.min() for m in maps)), 'vmax': float(max(m.max() for m in maps))}


def plot_metrics(rows: list[dict], path: str) -> None:
    layers = [r['layer'] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = [('teacher-student agreement', [('teacher_student_ce', 'CE(T, S)'), ('jsd', 'JSD(T, S)')]),
              ('attention entropy (nats)', [('teacher_entropy', 'teacher'), ('student_entropy', 'student')]),
              ('mean attention distance (px)', [('teacher_distance_px', 'teacher'),
                                                ('student_distance_px', 'student')])]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            values = [r[key] for r in rows]
            if any(v is not None for v in values):
                ax.plot(layers, [math.nan if v is None else v for v in values], marker='o', label=label)
        ax.set_title(title)
        ax.set_xlabel('layer')
        ax.set_xticks(layers)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_metrics(teacher, student, loader, layers: list[int], model=None) -> list[dict]:
    """Per layer, each metric's mean over its rows (attention rows, or patch-query rows for distances), of the
    maps each model uses (see maps_used; ``model``: the run's model, which says whether the student copies)."""
    sums = {layer: dict.fromkeys(METRICS, 0.0) for layer in layers}
    counts = {layer: dict.fromkeys(METRICS, 0) for layer in layers}

    def add(layer: int, key: str, values: torch.Tensor) -> None:
        sums[layer][key] += values.sum().item()
        counts[layer][key] += values.numel()

    dist_s = patch_distances(_grid(student), student.patch_embed.patch_size[0])
    dist_t = patch_distances(_grid(teacher), teacher.patch_embed.patch_size[0]) if teacher is not None else None
    for images, _, _ in loader:
        if len(images) == 0:
            continue
        used = maps_used(model, teacher, student, images, layers)
        s_maps, t_maps = used['student'], used.get('teacher', {})
        for layer in layers:
            s = s_maps[layer]
            add(layer, 'student_entropy', row_entropy(s))
            add(layer, 'student_distance_px', row_distance(s, dist_s, student.num_prefix_tokens))
            if teacher is not None:
                t = t_maps[layer]
                tc, sc = comparable(t, s)
                add(layer, 'teacher_student_ce', row_cross_entropy(tc, sc))
                add(layer, 'jsd', row_jsd(tc, sc))
                add(layer, 'teacher_entropy', row_entropy(t))
                add(layer, 'teacher_distance_px', row_distance(t, dist_t, teacher.num_prefix_tokens))
    return [{'layer': layer, **{k: sums[layer][k] / counts[layer][k] if counts[layer][k] else None for k in METRICS}}
            for layer in layers]


def check_flags(a) -> list[int] | None:
    """Flags no run of this tool can use, refused before any model is loaded; returns the --map_layers."""
    for flag, least, meaning in (('batch_size', 1, 'images per forward pass'), ('heads', 1, 'heads drawn per model'),
                                 ('num_images', 1, 'validation images the metrics average over'),
                                 ('num_show', 0, 'validation images to draw maps for'),
                                 ('num_workers', 0, 'data loading processes; 0 loads in this process')):
        if getattr(a, flag) < least:
            raise UserError(f"--{flag} {getattr(a, flag)}: must be >= {least} ({meaning})")
    map_layers = None
    if a.map_layers is not None:
        try:
            map_layers = sorted({int(x) for x in a.map_layers.split(',')})
        except ValueError:
            raise UserError(f"--map_layers {a.map_layers!r}: give layer numbers separated by commas, counted from 0 "
                            "(e.g. --map_layers 0,5,11)") from None
    if a.images is not None:
        if not a.images:
            raise UserError("--images names no file: give image files, or leave --images out to draw the first "
                            "--num_show validation images")
        for path in a.images:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError) as e:  # PIL reports corrupt files as either
                problem = f"not a readable image ({e})" if os.path.isfile(path) else "no such file"
                raise UserError(f"--images {path!r}: {problem}; give image files (PNG, JPEG, ...)") from e
    check_writable(a.output_dir, f"--output_dir {a.output_dir!r}", "give a folder this user can create "
                          "files in (the PNG and CSV files go there; it is created if missing)")
    return map_layers


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser('python tools/visualize_attention.py', description=__doc__,
                                     formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True, help='checkpoint written by main_finetune.py')
    p.add_argument('--teacher', default=None, help='teacher weights when the checkpoint does not hold them: a file '
                   'or a name (timm:NAME.tag, hf-hub:ORG/NAME, https:// URL) (default: the run\'s --finetune)')
    p.add_argument('--data_path', required=True, help='folder with val/<class>/ images')
    p.add_argument('--output_dir', required=True, help='where to write the PNG and CSV files')
    p.add_argument('--images', nargs='*', default=None, help='images to draw maps for (default: the first '
                   '--num_show validation images)')
    p.add_argument('--num_show', default=4, type=int, help='validation images to draw maps for')
    p.add_argument('--num_images', default=512, type=int, help='validation images the metrics average over')
    p.add_argument('--map_layers', default=None, help='layers whose full token maps are drawn (default: first, '
                   'middle, last)')
    p.add_argument('--heads', default=4, type=int, help='heads drawn per model')
    p.add_argument('--batch_size', default=16, type=int, help='images per forward pass (maps of every layer are '
                   'kept at once)')
    p.add_argument('--num_workers', default=4, type=int, help='data loading processes')
    a = p.parse_args(argv)
    map_layers = check_flags(a)
    teacher, student, spec, model = load_models(a.checkpoint, a.teacher)
    depth = len(student.blocks) if teacher is None else min(len(student.blocks), len(teacher.blocks))
    layers = list(range(depth))
    map_layers = map_layers or sorted({0, depth // 2, depth - 1})
    outside = [layer for layer in map_layers if not 0 <= layer < depth]
    if outside:
        raise UserError(f"--map_layers {a.map_layers}: no layer {', '.join(map(str, outside))}; the compared models "
                        f"have layers 0 to {depth - 1}")
    sources = student_map_sources(model, layers)
    transform = eval_transform(spec.img_size, spec.eval_crop_pct, spec.mean, spec.std)
    dataset = image_folder(os.path.join(a.data_path, 'val'), transform, 'val')

    models = {'teacher': teacher, 'student': student} if teacher is not None else {'student': student}
    shown = [transform(Image.open(f).convert('RGB')) for f in a.images] if a.images else [
        dataset[i][0] for i in range(min(a.num_show, len(dataset)))]
    subset = Subset(dataset, range(min(a.num_images, len(dataset))))
    loader = DataLoader(subset, batch_size=a.batch_size, num_workers=a.num_workers, collate_fn=collate_skipping_bad)
    # a copy student trained with maps averaged over examples attends with their mean over these images
    fix_evaluation_maps(loader, [model], torch.device('cpu'), contextlib.nullcontext())
    for k, image in enumerate(shown):
        maps = maps_used(model, teacher, student, image[None], layers)
        plot_cls_attention(image, maps, models, a.heads, os.path.join(a.output_dir, f'cls_attention_{k}.png'),
                           sources)
        for layer in map_layers:
            plot_token_maps(maps, layer, a.heads, os.path.join(a.output_dir, f'token_maps_{k}_layer{layer}.png'),
                            sources[layer])

    rows = [{**r, 'student_map': sources[r['layer']]} for r in layer_metrics(teacher, student, loader, layers, model)]
    with open(os.path.join(a.output_dir, 'attention_metrics.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['layer', *METRICS, 'student_map'])
        writer.writeheader()
        writer.writerows({k: ('' if v is None else v) for k, v in r.items()} for r in rows)
    plot_metrics(rows, os.path.join(a.output_dir, 'attention_metrics.png'))
    print(f"wrote {len(shown)} images' maps and per-layer metrics over {len(subset)} images to {a.output_dir}")
    copied = [layer for layer, source in sources.items() if source != 'own']
    if copied:
        print(f"mode {spec.mode}: in layers {', '.join(map(str, copied))} the student attends with what the teacher "
              f"hands over; its maps there are the ones it uses: {COPIED_MAP[model.mode.exposes]}"
              + (", so the teacher-student JSD is 0 by construction" if model.mode.exposes == 'attn' else ''))
    for r in rows:
        values = '  '.join(f"{k} {r[k]:.4f}" for k in METRICS if r[k] is not None)
        print(f"  layer {r['layer']:2d}  {values}  student map: {r['student_map']}")
    return rows


if __name__ == '__main__':
    run_cli(main)
