"""What timm / MAE / DeiT users take for granted: --help with every default, --log_dir following
--output_dir, checkpoint-best.pth (--save_best), best and final accuracy in log.txt, and a README whose
Python examples run.

README convention: a fenced ```python block directly preceded by the line ``<!-- readme-test: run -->``
is executed here, in a folder that holds what the README's commands around it produce
(runs/distill/checkpoint.pth from a distill run, and exported/student from
``python tools/export_student.py --checkpoint runs/distill/checkpoint.pth --output exported/student``).
Blocks without the marker (GPU recipes, data sets to download) are not run."""
import argparse
import importlib
import json
import os
import re
import textwrap

import pytest
import torch
from helpers import ROOT, make_image_folder, make_teacher_checkpoint, tiny_args

import main_finetune
from tools import export_student
from util.args import HelpFormatter
from util.output import BestAccuracy
from util.pretrained import read_checkpoint

MARKER = '<!-- readme-test: run -->'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 3-epoch distill run with an EMA and --save_best ema, written where the README's examples expect it;
    no --log_dir is given. (On this data the EMA's best comes neither first nor last.)"""
    root = tmp_path_factory.mktemp('conventions')
    data = make_image_folder(str(root / 'data'), train_per_class=8, val_per_class=4)
    teacher = make_teacher_checkpoint(str(root / 'teacher.pth'))
    out = str(root / 'runs' / 'distill')
    argv = tiny_args(data, out, '--mode', 'distill', '--finetune', teacher, '--lr', '3e-3', '--ema', '0.5',
                     '--save_best', 'ema', epochs=3)
    i = argv.index('--log_dir')
    del argv[i:i + 2]
    stats = main_finetune.run(argv)
    with open(os.path.join(out, 'log.txt')) as f:
        log = [json.loads(line) for line in f]
    return root, out, stats, log


def test_log_dir_defaults_to_output_dir(run):
    _, out, _, _ = run
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out))
    assert read_checkpoint(os.path.join(out, 'checkpoint.pth'))['args']['log_dir'] == out


def test_save_best_keeps_the_epoch_of_the_best_ema_top1(run):
    _, out, _, log = run
    accs = [line['ema_test_acc1'] for line in log]
    best_epoch = accs.index(max(accs))  # the first epoch that reached the best (later ties do not replace it)
    best = read_checkpoint(os.path.join(out, 'checkpoint-best.pth'))
    assert best['epoch'] == best_epoch
    assert best['best']['ema_test_acc1'] == {'acc1': max(accs), 'epoch': best_epoch}
    last = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    if best_epoch == len(log) - 1:
        assert all(torch.equal(best['model'][k], last['model'][k]) for k in last['model'])
    assert last['best'] == best['best'] or best_epoch < len(log) - 1


def test_log_records_best_and_final_raw_and_ema(run):
    _, _, stats, log = run
    for n, line in enumerate(log, start=1):
        for key in ('test_acc1', 'ema_test_acc1'):
            seen = [entry[key] for entry in log[:n]]
            assert line[f'best_{key}'] == max(seen)
            assert line[f'best_{key}_epoch'] == seen.index(max(seen))
    assert stats['best_test_acc1'] == log[-1]['best_test_acc1'] and stats['test_acc1'] == log[-1]['test_acc1']


def test_summary_line_names_best_and_final():
    best = BestAccuracy()
    best.update({'test_acc1': 50.0, 'ema_test_acc1': 40.0}, 0)
    best.update({'test_acc1': 45.0, 'ema_test_acc1': 60.0}, 1)
    line = best.summary({'test_acc1': 45.0, 'ema_test_acc1': 60.0})
    assert line == ('top-1 accuracy raw: final 45.00%, best 50.00% (epoch 0); '
                    'EMA: final 60.00%, best 60.00% (epoch 1)')


def test_save_best_ema_needs_an_ema(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), train_per_class=1, val_per_class=1)
    from util.errors import UserError
    with pytest.raises(UserError, match='--save_best ema'):
        main_finetune.run(tiny_args(data, str(tmp_path / 'o'), '--save_best', 'ema'))


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    return re.findall(re.escape(MARKER) + r'\n```python\n(.*?)\n```', text, flags=re.S)


def test_readme_python_examples_run(run, monkeypatch):
    root, _, _, _ = run
    blocks = readme_blocks()
    assert blocks, f"README.md has no block marked {MARKER}"
    monkeypatch.chdir(root)
    export_student.main(['--checkpoint', 'runs/distill/checkpoint.pth', '--output', 'exported/student'])
    for block in blocks:
        exec(compile(textwrap.dedent(block), 'README.md', 'exec'), {'__name__': '__readme__'})


def test_help_shows_defaults_and_modes_that_parse():
    parser = main_finetune.get_args_parser()
    full = argparse.ArgumentParser('python main_finetune.py', parents=[parser], formatter_class=HelpFormatter)
    text = ' '.join(full.format_help().split())
    assert text.startswith('usage: python main_finetune.py')
    for shown in ('(default: 64; --mode probe: 256)', '(default: 50)', 'else vit_large_patch16)',
                  '(default: 1000)', '(default: --output_dir)', '--lr, --weight_decay, --batch_size',
                  'does nothing here'):
        assert shown in text, shown
    choices = re.search(r'--mode \{([a-z_,]+)\}', text).group(1).split(',')
    assert 'None' not in choices
    for mode in choices:  # every listed choice parses
        assert full.parse_args(['--mode', mode]).mode == mode


@pytest.mark.parametrize('script', ['submitit_finetune.py', 'select_wild_data.py', 'tools/export_student.py',
                                    'tools/visualize_attention.py', 'tools/prepare_cifar.py',
                                    'tools/prepare_tinyimagenet.py'])
def test_every_entry_point_help_reads_as_a_command_with_defaults(script, capsys):
    module = importlib.import_module(script[:-3].replace('/', '.'))
    entry = module.parse_args if script == 'submitit_finetune.py' else (
        lambda argv: module.get_args_parser().parse_args(argv)) if script == 'select_wild_data.py' else module.main
    with pytest.raises(SystemExit):
        entry(['--help'])
    text = capsys.readouterr().out
    assert text.startswith(f'usage: python {script}')
    if script == 'submitit_finetune.py':
        text = ' '.join(text.split())
        for flag, default in (('--nodes', '2'), ('--ngpus', '8'), ('--timeout', '4320'), ('--epochs', '50')):
            assert re.search(re.escape(flag) + r' [A-Z_]+ .*?\(default: ' + default, text), flag
