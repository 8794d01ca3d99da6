"""Every command of docs/EXPERIMENTS.md runs, in the page's order, on tiny generated data with the same flags.

Each ```bash block's commands (lines joined at their backslashes) are run in this process:
``torchrun ... main_finetune.py ARGS`` and ``python main_finetune.py ARGS`` as main_finetune.run(ARGS);
``python submitit_finetune.py ARGS`` is first parsed as written by submitit_finetune's own parser, then run as
main_finetune.run with the SLURM job's flags dropped (``--job_dir D`` becoming ``--output_dir D``, where
submitit would write); the tools through their main(). What is made tiny, and nothing else: the model
(``--model X`` -> a ViT of ViT-L's depth and heads at width 64 on 32 x 32 images, so that the page's layer
and head choices apply as written), ``--input_size``, ``--batch_size``, ``--accum_iter``,
``--epochs``, ``--num_workers``, ``--nb_classes`` (the class folders of the tiny data), the device (CPU) and
the page's variables (paths to tiny data and checkpoints). Commands that score an ImageNet-1k model on the
shift sets get a tiny 1000-class checkpoint in place of the 3-class runs'."""
import os
import re
import shlex

import pytest
import torch
from helpers import ROOT, TINY_ARCH, kwargs_flags, make_teacher_checkpoint
from test_eval_shift import fake_set
from test_prepare_inat import miniature

import main_finetune
import submitit_finetune
from models_vit import create_vit
from tools import eval_shift, prepare_inat
from util.eval_classes import imagenet_synsets, read_eval_classes

DOC = os.path.join(ROOT, 'docs', 'EXPERIMENTS.md')
# the SLURM job's own flags (submitit_finetune.py), each with one value
SLURM_FLAGS = ('--nodes', '--ngpus', '--ncpus', '--mem_gb', '--timeout', '--partition', '--account', '--qos',
               '--constraint', '--exclude', '--comment', '--name', '--cluster', '--signal_delay', '--max_requeues')
# ViT-L's 24 blocks of 16 heads, 64 wide
ARCH = {**TINY_ARCH, 'embed_dim': 64, 'depth': 24, 'num_heads': 16}
TINY = {'--input_size': '32', '--batch_size': '8', '--accum_iter': '1', '--epochs': '1', '--num_workers': '0'}


DETECTION_SCRIPTS = ('main_detection.py', 'submitit_detection.py')  # run by tests/test_detection.py


def all_doc_commands() -> list[str]:
    with open(DOC, encoding='utf-8') as f:
        blocks = re.findall(r'```bash\n(.*?)\n```', f.read(), flags=re.S)
    lines = [line.strip() for block in blocks for line in re.sub(r'\\\n\s*', ' ', block).splitlines()]
    return [line for line in lines if line and not line.startswith('#')]


def doc_commands() -> list[str]:
    """The page's commands of main_finetune.py, its launcher and the tools (the detection ones: detection_commands)."""
    return [c for c in all_doc_commands() if not any(script in c for script in DETECTION_SCRIPTS)]


def detection_commands() -> list[str]:
    return [c for c in all_doc_commands() if any(script in c for script in DETECTION_SCRIPTS)]


def expand(command: str, env: dict) -> list[str]:
    unknown = set(re.findall(r'\$\{(\w+)\}', command)) - set(env)
    assert not unknown, f"EXPERIMENTS.md uses variables the page's table and this test do not define: {unknown}"
    return shlex.split(re.sub(r'\$\{(\w+)\}', lambda m: env[m.group(1)], command))


def replace_flags(argv: list[str], arch: dict, set_later: tuple[str, ...], resume: str | None = None) -> list[str]:
    """A documented command's flags with ``--model X`` as a ViT of ``arch``, the SLURM job's flags dropped
    (``--job_dir D`` becoming ``--output_dir D``, where submitit would write), the ``set_later`` flags removed (the
    caller sets them) and, with ``resume``, a --resume other than ``allow`` pointing there; every other flag kept."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag == '--model':
            out += ['--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(arch)]
            i += 2
        elif flag in SLURM_FLAGS or flag in set_later:
            i += 2
        elif flag == '--use_volta32':
            i += 1
        elif flag == '--job_dir':
            out += ['--output_dir', argv[i + 1]]
            i += 2
        elif flag == '--resume' and resume and argv[i + 1] != 'allow':
            out += ['--resume', resume]
            i += 2
        else:
            out.append(flag)
            i += 1
    return out


def tiny(argv: list[str], classifier: str | None = None) -> list[str]:
    """main_finetune.py's flags with the model, sizes and device made tiny (see the module's docstring)."""
    out = replace_flags(argv, ARCH, (*TINY, '--nb_classes'), classifier)
    data = out[out.index('--data_path') + 1] if '--data_path' in out else None
    if data and os.path.isdir(os.path.join(data, 'train')):
        out += ['--nb_classes', str(len(os.listdir(os.path.join(data, 'train'))))]
    return out + [x for flag, value in TINY.items() for x in (flag, value)] + ['--device', 'cpu']


def imagenet_classifier(path: str) -> str:
    """A run checkpoint of a tiny 1000-class plain ViT (what an ImageNet-1k run's checkpoint records)."""
    torch.manual_seed(0)
    vit = create_vit('vit_base_patch16_224', num_classes=1000, img_size=32, **ARCH)
    args = {'model': 'vit_base_patch16_224', 'model_kwargs': ARCH, 'mode': 'none', 'input_size': 32,
            'nb_classes': 1000, 'global_pool': True, 'student_model': 'vit_base_patch16_224', 'student_kwargs': ARCH}
    torch.save({'model': vit.state_dict(), 'args': args, 'epoch': 0}, path)
    return path


@pytest.mark.slow
def test_every_experiment_command_runs(labelled, tmp_path):
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), **ARCH)  # a 3-class classifier too
    inat_root = miniature(tmp_path / 'inat2018', '2018')
    a, r = read_eval_classes('imagenet-a', 1000), read_eval_classes('imagenet-r', 1000)
    env = {
        'IMAGENET': labelled.data, 'MAE_L': teacher, 'MAE_L_FT': teacher, 'STUDENT_INIT': teacher,
        # the teachers of other sizes and pre-trainings: the tiny teacher too (their layouts: test_teacher_layouts)
        **{name: teacher for name in ('MAE_B', 'MAE_H', 'SUPERVISED_L', 'DINO_B', 'DINOV2_L', 'CLIP_L')},
        'RUNS': str(tmp_path / 'runs'), 'JOB_DIR': str(tmp_path / 'jobs'),
        'INAT_ROOT': inat_root, 'INAT': str(tmp_path / 'inat2018_folders'),
        'IMAGENET_A': fake_set(tmp_path / 'imagenet_a', a.synsets, None),
        'IMAGENET_R': fake_set(tmp_path / 'imagenet_r', r.synsets, None),
        'IMAGENET_SKETCH': fake_set(tmp_path / 'imagenet_sketch', imagenet_synsets(), None),
        'IMAGENET_V2': fake_set(tmp_path / 'imagenet_v2', [str(i) for i in range(1000)], None),
    }
    classifier = imagenet_classifier(str(tmp_path / 'imagenet_classifier.pth'))
    commands = doc_commands()
    assert len(commands) >= 60
    ran = []
    for command in commands:
        argv = expand(command, env)
        if argv[0] == 'torchrun':
            argv = argv[argv.index('main_finetune.py') + 1:]
            main_finetune.run(tiny(argv))
        elif argv[:2] == ['python', 'main_finetune.py']:
            main_finetune.run(tiny(argv[2:], classifier if '--eval_classes' in argv else None))
        elif argv[:2] == ['python', 'submitit_finetune.py']:
            submitit_finetune.parse_args(argv[2:])  # as written, by the launcher's own parser
            main_finetune.run(tiny(argv[2:]))
        elif argv[:2] == ['python', 'tools/prepare_inat.py']:
            prepare_inat.main(argv[2:])
        elif argv[:2] == ['python', 'tools/eval_shift.py']:
            rows = eval_shift.main(tiny(argv[2:], classifier))
            assert [row['set'] for row in rows] == ['ImageNet-A', 'ImageNet-R', 'ImageNet-Sketch', 'ImageNetV2']
        else:
            pytest.fail(f"EXPERIMENTS.md: no runner for {command[:80]!r}")
        ran.append(command)
    assert len(ran) == len(commands)
    # the runs wrote what the later commands read
    assert os.path.isfile(tmp_path / 'runs' / 'distill_vitl' / 'checkpoint.pth')
    assert os.path.isfile(tmp_path / 'runs' / 'distill_vitl_shift' / 'shift_results.md')
    assert os.path.isfile(tmp_path / 'runs' / 'distill_vitl_imagenet_r' / 'eval_results.json')
    for run in ('copy_q_vitl', 'distill_v_vitl', 'copy_vitl_every_other', 'distill_vith_mae_recipe', 'scratch_vith',
                'distill_vitl_reverse_kl', 'distill_vitl_haste',
                'distill_vitl_clip', 'distill_vitl_init_norm_qk'):
        assert os.path.isfile(tmp_path / 'jobs' / run / 'checkpoint.pth'), run
