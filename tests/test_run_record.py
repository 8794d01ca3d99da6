"""The run record: config.yaml (read back by --config), run_record.json (each start), console.txt, the record in
checkpoints and eval_results.json; flags spelled in full; mistakes refused before anything is written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import args_for, read_log, torchrun

import main_finetune
import main_pretrain
from util.args import parse_command
from util.errors import UserError
from util.run_record import CONFIG_FILE, CONSOLE_FILE, RECORD_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def distill_run(workdir):
    out = str(workdir.root / 'distill')
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', epochs=1))
    return out


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_a_run_folder_holds_its_configuration_record_and_console(distill_run):
    config = read_yaml(os.path.join(distill_run, CONFIG_FILE))
    assert config['mode'] == 'distill' and config['epochs'] == 1 and config['lr'] == 3e-3
    assert config['atd_weight'] == 3.0  # the distill mode's own default, as resolved
    with open(os.path.join(distill_run, RECORD_FILE)) as f:
        starts = json.load(f)['starts']
    assert len(starts) == 1
    start = starts[0]
    assert start['argv'][0] == 'main_finetune.py' and '--mode distill' in start['command']
    assert start['versions']['torch'] == torch.__version__ and start['versions']['timm']
    revision = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert start['git']['revision'] == revision and isinstance(start['git']['dirty'], bool)
    assert start['epoch'] == 0 and start['devices'] == ['cpu'] and start['world_size'] == 1
    ckpt = torch.load(os.path.join(distill_run, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    assert ckpt['args']['run_record'] == starts  # the checkpoint alone says how it was made
    with open(os.path.join(distill_run, CONSOLE_FILE)) as f:
        console = f.read()
    assert 'mode distill: teacher vit_base_patch16_224' in console  # from before the folder existed
    assert 'start training for 1 epochs' in console and 'Epoch [0] averaged' in console and 'Acc@1' in console


def test_the_config_file_starts_the_same_run(workdir, distill_run):
    again = str(workdir.root / 'again')
    main_finetune.run(['--config', os.path.join(distill_run, CONFIG_FILE), '--output_dir', again])
    first, second = read_yaml(os.path.join(distill_run, CONFIG_FILE)), read_yaml(os.path.join(again, CONFIG_FILE))
    assert {k for k in first if first[k] != second[k]} == {'output_dir'}
    assert read_log(again)[0]['train_loss'] == pytest.approx(read_log(distill_run)[0]['train_loss'], rel=1e-6)


def test_the_command_line_wins_over_the_config_file(workdir, distill_run, tmp_path):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(f"data_path: {workdir.data}\nepochs: 7\nbatch_size: 4\n")
    args, given = parse_command(main_finetune.command_parser(), ['--config', str(recipe),
                                                                               '--epochs', '2'])
    assert (args.epochs, args.batch_size, args.data_path) == (2, 4, workdir.data)
    assert {'epochs', 'batch_size', 'data_path'} <= set(given)  # a recipe's values are not the mode's to change


@pytest.mark.parametrize('text,message', [('epoch: 3\n', 'epoch: did you mean epochs?'),
                                          ('mode: distil\n', "mode: 'distil' is not one of"),
                                          ('blr: fast\n', "blr: 'fast' is not a valid value"),
                                          ('- 1\n', 'not a mapping')])
def test_a_config_file_with_a_wrong_entry_is_refused(tmp_path, text, message):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_command(main_finetune.command_parser(), ['--config', str(recipe)])


def test_a_resumed_run_adds_its_start(workdir, distill_run):
    out = str(workdir.root / 'resumed')
    shutil.copytree(distill_run, out)
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--resume', 'allow', epochs=2))
    with open(os.path.join(out, RECORD_FILE)) as f:
        starts = json.load(f)['starts']
    assert [s['epoch'] for s in starts] == [0, 1]
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    assert ckpt['args']['run_record'] == starts


def test_eval_results_name_the_checkpoint_epoch_step_and_date(workdir, distill_run, tmp_path):
    ckpt = os.path.join(distill_run, 'checkpoint.pth')
    main_finetune.run(['--eval', '--resume', ckpt, '--data_path', workdir.data, '--output_dir', str(tmp_path),
                       '--device', 'cpu', '--num_workers', '0'])
    with open(tmp_path / 'eval_results.json') as f:
        record = json.load(f)
    assert (record['checkpoint'], record['epoch'], record['step']) == (ckpt, 0, None)
    assert record['date'].startswith('20')


# ---- the command line: full flag names, short errors ---------------------------------------------------------
def command(script, *argv):
    return subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('script', ['main_finetune.py', 'main_pretrain.py'])
def test_abbreviated_and_misspelt_flags_get_one_line_naming_the_flag(script):
    out = command(script, '--epoch', '1')
    assert out.returncode == 2 and '--epoch: did you mean --epochs' in out.stderr, out.stderr
    out = command(script, '--bacth_size', '4')
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) <= 3 and '--batch_size' in lines[0], out.stderr


def test_an_input_size_the_patch_does_not_divide_is_refused_before_any_folder(workdir, tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(UserError, match=r'--input_size: input size 36 is not a multiple of the patch size 8 .*'
                                        r'sizes that fit: 32 or 40'):
        main_finetune.run(args_for(workdir, str(out), '--mode', 'distill', '--input_size', '36'))
    assert not out.exists()
    with pytest.raises(UserError, match='sizes that fit: 24 or 32'):
        main_pretrain.run(['--data_path', workdir.data, '--output_dir', str(out), '--model', 'vit_base_patch16_224',
                           '--model_kwargs', 'patch_size=8', 'embed_dim=48', 'depth=2', 'num_heads=3',
                           '--input_size', '30', '--device', 'cpu', '--num_workers', '0'])
    assert not out.exists()


def test_a_run_refused_after_its_folder_was_made_leaves_no_folder(workdir, tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(UserError, match='class'):  # 3 class folders, 7 classes asked for
        main_finetune.run(args_for(workdir, str(out), '--mode', 'distill', '--nb_classes', '7'))
    assert not out.exists()


def test_more_workers_than_cpus_are_lowered_with_one_line(workdir, tmp_path, capsys):
    from util.args import usable_workers

    cpus = len(os.sched_getaffinity(0))
    assert usable_workers(cpus + 8) == cpus
    assert f"--num_workers {cpus + 8}: this process may use {cpus} CPUs" in capsys.readouterr().out
    assert usable_workers(cpus) == cpus


def test_eval_of_a_finetune_checkpoint_says_what_resume_would_do(workdir, distill_run, tmp_path, capsys):
    ckpt = os.path.join(distill_run, 'checkpoint.pth')
    main_finetune.run(['--eval', '--finetune', ckpt, '--data_path', workdir.data, '--output_dir', str(tmp_path),
                       '--device', 'cpu', '--num_workers', '0', '--nb_classes', '3', '--input_size', '32'])
    assert (f"--eval --finetune {ckpt}: its weights in the model these flags describe (resized to them); "
            f"--eval --resume {ckpt} evaluates the model the checkpoint records") in capsys.readouterr().out


def test_evaluating_a_copy_student_with_averaged_maps_does_not_depend_on_the_batch(workdir, tmp_path, capsys):
    """--map_average examples: the run's own evaluation (batch 8) and --eval --resume one image at a time agree,
    and both say over how many images the teacher's maps were averaged."""
    out = str(tmp_path / 'copy')
    stats = main_finetune.run(args_for(workdir, out, '--mode', 'copy', '--map_average', 'examples', epochs=1))
    evaluated = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--batch_size', '1',
                                   '--data_path', workdir.data, '--output_dir', str(tmp_path / 'eval'), '--device',
                                   'cpu', '--num_workers', '0'])
    assert evaluated['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-5)
    assert evaluated['test_acc1'] == stats['test_acc1']
    said = capsys.readouterr().out
    assert said.count("--map_average examples: the copy student attends with the teacher's maps averaged over the "
                      f"{stats['test_images']} evaluation images") == 2


@pytest.mark.slow
def test_a_copy_student_with_averaged_maps_evaluates_the_same_over_two_processes(workdir, tmp_path):
    """--dist_eval in two processes, each with its shard of the evaluation set: the teacher's maps are averaged
    over every image of both, so the result is the single process's."""
    out = str(tmp_path / 'copy')
    stats = main_finetune.run(args_for(workdir, out, '--mode', 'copy', '--map_average', 'examples', epochs=1))
    evaluated = str(tmp_path / 'eval')
    proc = torchrun(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--batch_size', '3', '--dist_eval',
                     '--data_path', workdir.data, '--output_dir', evaluated, '--device', 'cpu', '--num_workers', '0'])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(evaluated, 'eval_results.json')) as f:
        results = json.load(f)
    assert results['test_images'] == stats['test_images']
    assert results['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-5)
    assert f"maps averaged over the {stats['test_images']} evaluation images" in proc.stdout
