"""The README's Python examples run.

Convention: a fenced ```python block directly preceded by the line ``<!-- readme-test: run -->`` is executed
here, in a folder that holds what the README's commands around it produce (runs/distill/checkpoint.pth from
a distill run, and exported/student from
``python tools/export_student.py --checkpoint runs/distill/checkpoint.pth --output exported/student``).
Blocks without the marker (GPU recipes, data sets to download) are not run."""
import os
import re
import shutil
import textwrap

import pytest
import timm
import torch
from helpers import ROOT

from tools import export_student
from util.pretrained import read_checkpoint

MARKER = '<!-- readme-test: run -->'


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    return re.findall(re.escape(MARKER) + r'\n```python\n(.*?)\n```', text, flags=re.S)


def test_readme_python_examples_run(ema_distill_run, tmp_path, monkeypatch, capsys):
    """The README's blocks run, and do what the README says of them: the exported folder loads with timm,
    by folder (``model``) and by the architecture and arguments config.json records (``same``), as the
    trained student (the logits of the checkpoint's student weights in a timm ViT of its recorded
    architecture), and resolve_data_config gives the input size and the normalisation it was trained with."""
    blocks = readme_blocks()
    assert blocks, f"README.md has no block marked {MARKER}"
    # a copy of the shared run's folder: the export writes beside it
    shutil.copytree(ema_distill_run.root / 'runs', tmp_path / 'runs')
    monkeypatch.chdir(tmp_path)
    export_student.main(['--checkpoint', 'runs/distill/checkpoint.pth', '--output', 'exported/student'])
    capsys.readouterr()
    namespace = {'__name__': '__readme__'}
    for block in blocks:
        exec(compile(textwrap.dedent(block), 'README.md', 'exec'), namespace)
    printed = capsys.readouterr().out
    assert {'model', 'same', 'data_config', 'x'} <= set(namespace), "the README's example no longer defines them"
    model, same, data_config, x = (namespace[k] for k in ('model', 'same', 'data_config', 'x'))
    saved = read_checkpoint('runs/distill/checkpoint.pth')
    args, spec = saved['args'], saved['args']['model_spec']
    student = timm.create_model(spec['student']['name'], pretrained=False, num_classes=spec['num_classes'],
                                img_size=spec['img_size'], global_pool=spec['student']['global_pool'],
                                **spec['student']['kwargs']).eval()
    student.load_state_dict(saved['model'])
    with torch.no_grad():
        expected = student(x)
        assert torch.equal(model(x), expected) and torch.equal(same(x), expected)
    assert data_config['input_size'] == (3, args['input_size'], args['input_size'])
    assert list(data_config['mean']) == pytest.approx(args['mean']) and list(data_config['std']) == pytest.approx(
        args['std'])
    assert printed.strip() == f"{data_config['mean']} {data_config['std']}"
