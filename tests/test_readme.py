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

from helpers import ROOT

from tools import export_student

MARKER = '<!-- readme-test: run -->'


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    return re.findall(re.escape(MARKER) + r'\n```python\n(.*?)\n```', text, flags=re.S)


def test_readme_python_examples_run(ema_distill_run, tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert blocks, f"README.md has no block marked {MARKER}"
    # a copy of the shared run's folder: the export writes beside it
    shutil.copytree(ema_distill_run.root / 'runs', tmp_path / 'runs')
    monkeypatch.chdir(tmp_path)
    export_student.main(['--checkpoint', 'runs/distill/checkpoint.pth', '--output', 'exported/student'])
    for block in blocks:
        exec(compile(textwrap.dedent(block), 'README.md', 'exec'), {'__name__': '__readme__'})
