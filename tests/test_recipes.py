"""recipes/: each file is the experiment its documented commands run. For every recipe NAME, docs/EXPERIMENTS.md
has a torchrun command writing ${RUNS}/NAME and a SLURM command writing ${JOB_DIR}/NAME; both, and the
README's seed commands, parse to the same configuration as ``--config recipes/NAME.yaml`` with the same
site flags (data, teacher file, output, job placement, accumulation)."""
import os
import re
import shlex

import pytest
import yaml

import main_detection
import main_finetune
import submitit_finetune
from util.args import parse_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, 'recipes')
# Where and on what a run is made (each user's own): given beside --config, not in a recipe.
SITE = {'data_path', 'eval_data_path', 'output_dir', 'log_dir', 'job_dir', 'nodes', 'ngpus', 'accum_iter', 'resume',
        'finetune', 'student_init', 'config'}
# The README's seed commands, by the comment above each.
README_SEEDS = {'attention distillation, ViT-L, MAE teacher': 'distill_vitl', 'attention copy': 'copy_vitl'}


def commands(path):
    """Each command of the file's bash blocks (continuation lines joined) with the comment line above it."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    found = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        comment = ''
        for line in block.replace('\\\n', ' ').splitlines():
            if line.startswith('#'):
                comment = line.lstrip('# ').strip()
            elif line.strip():
                found.append((comment, shlex.split(line)))
    return found


def script_argv(argv):
    """(the script's parser, its arguments) of a documented command (torchrun's own flags dropped)."""
    script = next(i for i, word in enumerate(argv) if word.endswith('.py'))
    return os.path.basename(argv[script]), argv[script + 1:]


# each training script, and its SLURM launcher
SCRIPTS = {'main_finetune.py': 'submitit_finetune.py', 'main_detection.py': 'submitit_detection.py'}
ENTRIES = {'main_finetune.py': main_finetune, 'main_detection.py': main_detection}


def main_script(name):
    return next(main for main, launcher in SCRIPTS.items() if name in (main, launcher))


def parser_of(name):
    entry = ENTRIES[main_script(name)]
    if name in SCRIPTS.values():
        return submitit_finetune.command_parser(entry, name)
    return entry.command_parser()


def experiment(name, argv):
    """The experiment a command runs: its parsed flags and the flags it gives, without the site's."""
    args, given = parse_command(parser_of(name), argv)
    flags = set(ENTRIES[main_script(name)].command_parser().parse_args([]).__dict__)
    values = {k: v for k, v in vars(args).items() if k in flags and k not in SITE}
    return values, sorted(set(given) - SITE)


def documented():
    """recipe name -> [(where, script, argv)] of the commands that run it."""
    found = {}
    for _comment, argv in commands('docs/EXPERIMENTS.md'):
        name, args = script_argv(argv)
        for flag in ('--output_dir', '--job_dir'):
            if flag in args and name in (*SCRIPTS, *SCRIPTS.values()) and '--eval' not in args:
                recipe = os.path.basename(args[args.index(flag) + 1])
                found.setdefault(recipe, []).append((f'EXPERIMENTS.md {flag} {recipe}', name, args))
    for comment, argv in commands('README.md'):
        if comment in README_SEEDS:
            name, args = script_argv(argv)
            found[README_SEEDS[comment]].append((f'README.md "{comment}"', name, args))
    return found


def recipe_argv(recipe, argv):
    """``--config recipes/NAME.yaml`` with the command's site flags."""
    out, i = ['--config', os.path.join(RECIPES, f'{recipe}.yaml')], 0
    while i < len(argv):
        if argv[i].startswith('--') and argv[i][2:] in SITE:
            out.append(argv[i])
            while i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                i += 1
                out.append(argv[i])
        i += 1
    return out


def test_every_documented_experiment_has_its_recipe_and_both_commands():
    found = documented()
    shipped = sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith('.yaml'))
    assert sorted(found) == shipped
    for recipe, cmds in found.items():
        main = main_script(cmds[0][1])
        assert {name for _, name, _ in cmds} == {main, SCRIPTS[main]}, recipe


@pytest.mark.parametrize('recipe', sorted(documented()))
def test_a_recipe_file_is_the_experiment_of_its_documented_commands(recipe):
    with open(os.path.join(RECIPES, f'{recipe}.yaml')) as f:
        assert not set(yaml.safe_load(f)) & SITE, 'a recipe names no site flag'
    for where, name, argv in documented()[recipe]:
        assert experiment(name, argv) == experiment(name, recipe_argv(recipe, argv)), where


def write_recipes():
    """(Re)write recipes/ from the documented commands: ``python tests/test_recipes.py``."""
    os.makedirs(RECIPES, exist_ok=True)
    for recipe, cmds in sorted(documented().items()):
        where, name, argv = next(c for c in cmds if c[1] in SCRIPTS)
        args, given = parse_command(parser_of(name), argv)
        values = {k: getattr(args, k) for k in given if k not in SITE}
        # the documented single-node command's accumulation, and the effective batch it gives on 8 GPUs
        accum, batch = args.accum_iter, args.batch_size * 8 * args.accum_iter
        header = (f"# {recipe}: the experiment of docs/EXPERIMENTS.md that writes ${{RUNS}}/{recipe}.\n"
                  "# Give the site's flags beside it: --data_path, --finetune (the teacher), --output_dir, and\n"
                  f"# --accum_iter {accum} on one node of 8 GPUs (an effective batch of {batch}), e.g.\n"
                  f"#   torchrun --nproc_per_node 8 {name} --config recipes/{recipe}.yaml \\\n"
                  f"#       --accum_iter {accum} --data_path ... --finetune ... --output_dir ...\n")
        with open(os.path.join(RECIPES, f'{recipe}.yaml'), 'w') as f:
            f.write(header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))


if __name__ == '__main__':
    write_recipes()
