"""Write docs/TEACHERS.md from the results of tests/test_teacher_layouts.py: which released teacher files load and
which are refused, with the refusal each gets.

    python tools/teachers_table.py            # runs the tests, then writes the page

Each "loads" cell is the outcome of the test that loads a tiny model written in that layout (pass / FAIL / not
run), and each refusal is the message the loader gives such a file on this machine, so the page can only list a
layout as loading when its test passed here.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

TEST = 'tests/test_teacher_layouts.py'
LOADS = 'test_a_released_layout_loads_every_tensor_of_its_teacher'
REFUSED = 'test_a_layout_torch_cannot_read_is_refused_with_its_conversion'
INTRO = """\
# Teachers by pre-training: which released files load

Which teacher files, as their authors release them, `--finetune` (and `--student_init`, `--ensemble_with`) reads.
Each row is a test of `tests/test_teacher_layouts.py`: a tiny ViT with random weights written in the release's
layout loads into the timm model the teacher is built as, every tensor equal to the written one (after the
conversion the layout needs), or is refused with the message below. The architecture of a real file is named
with `--model` (see [EXPERIMENTS.md](EXPERIMENTS.md#which-teacher-pre-training)); names such as
`timm:vit_large_patch14_dinov2.lvd142m` give it themselves ([TRANSFER.md](TRANSFER.md#teachers-by-name)).
"""
JAX = """\
## Converting JAX weights (FLIP)

FLIP's code is JAX and its weights are released as `.zip` downloads; this project reads torch (`.pth`) and
`.safetensors` files. Convert the image encoder once, with JAX / Flax installed, into the state dict of the timm ViT
of its size (`vit_large_patch16_224` for ViT-L/16, `vit_huge_patch14_224` for ViT-H/14, with the encoder's pooling
and prefix tokens), save it with `torch.save` and give that file as `--finetune FILE --model ARCH`; the loader
checks every key and shape against the model and names those that do not fit. Flax stores a dense kernel as
(in, out), a convolution kernel as (kh, kw, in, out), and its multi-head attention's query, key and value kernels
as (D, heads, head_dim), its output kernel as (heads, head_dim, D); timm's tensors are:

"""


JAX_ROWS = (  # (Flax parameter, its role and shape; the timm tensor; the conversion)
    ('patch embedding kernel (p, p, 3, D), bias (D,)', '`patch_embed.proj.weight` (D, 3, p, p), `.bias`',
     'permute (3, 2, 0, 1)'),
    ('class token (1, 1, D)', '`cls_token`', 'as is'),
    ('position embedding (1, N, D)', '`pos_embed`', 'as is (the class token\'s row first, where it has one)'),
    ("each LayerNorm's `scale`, `bias`", '`blocks.i.norm1` / `norm2`, the final `norm`: `.weight`, `.bias`', 'rename'),
    ('query, key, value kernels (D, heads, head_dim)', '`blocks.i.attn.qkv.weight` (3D, D)',
     'each reshaped to (D, D) and transposed; q, k, v stacked in that order'),
    ('query, key, value biases (heads, head_dim)', '`blocks.i.attn.qkv.bias` (3D,)', 'flattened, stacked'),
    ('output kernel (heads, head_dim, D), bias (D,)', '`blocks.i.attn.proj.weight` (D, D), `.bias`',
     'reshaped to (D, D) and transposed'),
    ('MLP dense kernels (in, out), biases', '`blocks.i.mlp.fc1` / `fc2`: `.weight` (out, in), `.bias`', 'transposed'),
)


def outcome(outcomes: dict, test: str, name: str) -> str:
    return outcomes.get(f'{test}[{name}]', 'not run')


def refusal(name: str) -> str:
    """The loader's message for a tiny file of the layout, the temporary path shown as the example's name."""
    from test_teacher_layouts import LAYOUTS, model_of, written

    from util.errors import UserError
    from util.pretrained import load_pretrained_weights
    with tempfile.TemporaryDirectory() as tmp:
        _, path = written(name, Path(tmp))
        try:
            load_pretrained_weights(model_of(LAYOUTS[name], seed=2), path, flag='--finetune')
        except UserError as e:
            return str(e).replace(path, LAYOUTS[name].example)
    return 'read (not refused)'


def main() -> None:
    import torch
    from test_teacher_layouts import LAYOUTS

    from tools.families_table import run_tests
    outcomes = run_tests(TEST)
    lines = [INTRO.rstrip(), '', f'Command: `python tools/teachers_table.py`. Machine: {platform.machine()} CPU, '
             f'{platform.system()}, torch {torch.__version__}. Date: {datetime.date.today().isoformat()}.', '',
             '| pre-training | released file (example) | layout | loads (test) | tiny model of the test |',
             '|---|---|---|---|---|']
    for name, layout in LAYOUTS.items():
        if layout.refusal is None:
            lines.append(f'| {layout.pretraining} | `{layout.example}` | {layout.layout} | '
                         f'{outcome(outcomes, LOADS, name)} | `{layout.arch}` |')
    lines += ['', '## Refused, with what to do', '', '| pre-training | released file (example) | layout | refused '
              '(test) | message |', '|---|---|---|---|---|']
    for name, layout in LAYOUTS.items():
        if layout.refusal is not None:
            lines.append(f'| {layout.pretraining} | `{layout.example}` | {layout.layout} | '
                         f'{outcome(outcomes, REFUSED, name)} | {refusal(name)} |')
    lines += ['', JAX.rstrip(), '', '| Flax parameter (role) | timm tensor | conversion |', '| --- | --- | --- |']
    lines += [f'| {flax} | {timm} | {how} |' for flax, timm, how in JAX_ROWS]
    with open(os.path.join(ROOT, 'docs', 'TEACHERS.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
