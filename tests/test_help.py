"""--help of every entry point: a usage line that reads as the command, and every default shown."""
import argparse
import importlib
import re

import pytest

import main_finetune
from util.args import HelpFormatter


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


@pytest.mark.parametrize('script', ['main_pretrain.py', 'main_detection.py', 'submitit_finetune.py',
                                    'submitit_detection.py', 'select_wild_data.py', 'tools/export_student.py',
                                    'tools/visualize_attention.py', 'tools/prepare_cifar.py',
                                    'tools/prepare_tinyimagenet.py', 'tools/make_coco_miniature.py'])
def test_every_entry_point_help_reads_as_a_command_with_defaults(script, capsys):
    module = importlib.import_module(script[:-3].replace('/', '.'))
    entry = module.run if script in ('main_pretrain.py', 'main_detection.py') else (
        module.parse_args if script == 'submitit_finetune.py' else
        (lambda argv: module.get_args_parser().parse_args(argv)) if script == 'select_wild_data.py' else module.main)
    with pytest.raises(SystemExit):
        entry(['--help'])
    text = capsys.readouterr().out
    assert text.startswith(f'usage: python {script}')
    if script == 'submitit_finetune.py':
        text = ' '.join(text.split())
        for flag, default in (('--nodes', '2'), ('--ngpus', '8'), ('--timeout', '4320'), ('--epochs', '50')):
            assert re.search(re.escape(flag) + r' [A-Z_]+ .*?\(default: ' + default, text), flag
    if script in ('main_detection.py', 'submitit_detection.py'):
        text = ' '.join(text.split())
        for flag, default in (('--input_size', '1024'), ('--window_size', '16'), ('--layer_decay', '0.7'),
                              ('--mode', 'distill')):
            assert re.search(re.escape(flag) + r' [A-Za-z_{},]+ .*?\(default: ' + default, text), flag
    if script == 'main_pretrain.py':
        text = ' '.join(text.split())
        for flag, default in (('--mask_ratio', '0.75'), ('--decoder_embed_dim', '512'), ('--epochs', '800')):
            assert re.search(re.escape(flag) + r' [A-Z_]+ .*?\(default: ' + default, text), flag


# ---- moved from test_bad_input.py: DFND_DeiT-train.py --help -------------------------------------------------------
def test_dfnd_help_shows_every_default(capsys):
    from test_reference_probe import load_dfnd

    with pytest.raises(SystemExit):
        load_dfnd().main(['--help'])
    blocks = {b.split()[0]: ' '.join(b.split()) for b in re.split(r'\n  (?=-)', capsys.readouterr().out)[1:]}
    for flag, default in (('--num_select', '600000'), ('--nb_classes', '10'), ('--lr_S', '0.00075'),
                          ('--dataset', 'cifar10'), ('--attnlier', '0.05'), ('--outlier', '0.9')):
        assert f'(default: {default}' in blocks[flag], blocks[flag]
