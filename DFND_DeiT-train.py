"""The Attention Probe reference's command, unchanged: its flags mapped onto this project's two steps.

    python DFND_DeiT-train.py --dataset cifar10 --data_cifar $root_cifar10 --data_imagenet $root_wild \\
        --num_select 650000 --teacher_dir $teacher --selected_file $selected --output_dir $out \\
        --nb_classes 10 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist

runs

    select_wild_data.py --teacher $teacher --wild_path $root_wild --num_select 650000 \\
        --output ${selected}selection.pth --nb_classes 10 --score output --attnlier 0.05 --outlier 0.9
    main_finetune.py --mode probe --finetune $teacher --selection ${selected}selection.pth \\
        --eval_data_path $root_cifar10 --nb_classes 10 --lr 7.5e-4 --output_dir ${out}student \\
        --log_dir ${out}student --input_size 32 --teacher_acc 0.9665 --patchattn 0.8 --sched step \\
        --student_model vit_tiny_patch16_224 --student_kwargs patch_size=4 embed_dim=128 num_heads=2

(``translate`` is the whole mapping; the README has the table). Everything else comes from the two
scripts' probe defaults, which are the reference's: AdamW, weight decay 0.025, batch 256, class-token
models, epochs from 320,000 x 512 image presentations, x0.1 at epochs 200 and 300. Like the reference,
a rerun reuses the scores already computed. --data_cifar must be the ImageFolder layout that
tools/prepare_cifar.py writes (train/ and val/), where the reference reads CIFAR's own files. Flags
this script does not know are passed on to main_finetune.py (e.g. --epochs, --device, --num_workers).
"""
from __future__ import annotations

import argparse
import os
import sys

import main_finetune
import select_wild_data

# The teacher accuracy the reference hard-codes per data set: the diagonal of the noise transition matrix.
TEACHER_ACC = {'cifar10': 0.9665, 'cifar100': 0.7630}
# The reference's CIFAR student: 32x32 input, 4x4 patches, width 128, 12 blocks, 2 heads, MLP ratio 4.
STUDENT = ['--input_size', '32', '--student_model', 'vit_tiny_patch16_224',
           '--student_kwargs', 'patch_size=4', 'embed_dim=128', 'num_heads=2']


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('Attention Probe, the reference\'s command', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='cifar10', choices=list(TEACHER_ACC),
                   help='target task; sets the teacher accuracy of the noise adaptation as the reference')
    p.add_argument('--data_cifar', required=True, help='target task folder with train/ and val/ '
                   '(tools/prepare_cifar.py) -> main_finetune.py --eval_data_path')
    p.add_argument('--data_imagenet', required=True, help='the wild image folder -> select_wild_data.py --wild_path')
    p.add_argument('--num_select', default=650000, type=int, help='wild images to keep -> --num_select')
    p.add_argument('--teacher_dir', required=True, help='the teacher checkpoint (a file, as in the reference) '
                   '-> --teacher / --finetune')
    p.add_argument('--selected_file', required=True,
                   help='prefix of the selection files, as in the reference (e.g. selected/cifar10/): the '
                        'selection is written to <prefix>selection.pth')
    p.add_argument('--output_dir', required=True, help='the student goes to <output_dir>student, as in the reference')
    p.add_argument('--nb_classes', default=10, type=int, help='classes of the target task -> --nb_classes')
    p.add_argument('--lr_S', default=7.5e-4, type=float, help='student learning rate -> --lr')
    p.add_argument('--attnprobe_sel', action='store_true',
                   help='rank by the output score alone, as the released code does -> --score output '
                        '(without it: the combination, --score combined)')
    p.add_argument('--attnprobe_dist', action='store_true',
                   help='add the patch attention probe loss -> --patchattn PATCHATTN (without it: --patchattn 0)')
    p.add_argument('--robust', action='store_true', help='class-balance weighted KD -> --robust')
    p.add_argument('--random', action='store_true', help='random selection baseline -> --random')
    p.add_argument('--attnlier', default=0.05, type=float, help='-> select_wild_data.py --attnlier')
    p.add_argument('--outlier', default=0.9, type=float, help='-> select_wild_data.py --outlier')
    p.add_argument('--patchattn', default=0.8, type=float, help='-> main_finetune.py --patchattn')
    p.add_argument('--cos', action='store_true', help='cosine lr schedule -> --sched cosine (default: step)')
    return p


def translate(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], list[str]]:
    """The argument lists of select_wild_data.py and main_finetune.py for the reference's flags."""
    selection = args.selected_file + 'selection.pth'  # the reference appends its file names to the prefix
    student_dir = os.path.join(args.output_dir, 'student')  # the reference: output_dir + 'student/'
    select = ['--teacher', args.teacher_dir, '--wild_path', args.data_imagenet, '--num_select', str(args.num_select),
              '--output', selection, '--nb_classes', str(args.nb_classes),
              '--score', 'output' if args.attnprobe_sel else 'combined',
              '--attnlier', str(args.attnlier), '--outlier', str(args.outlier)] + (['--random'] if args.random else [])
    train = ['--mode', 'probe', '--finetune', args.teacher_dir, '--selection', selection,
             '--eval_data_path', args.data_cifar, '--nb_classes', str(args.nb_classes), '--lr', str(args.lr_S),
             '--output_dir', student_dir, '--log_dir', student_dir, '--teacher_acc', str(TEACHER_ACC[args.dataset]),
             '--patchattn', str(args.patchattn if args.attnprobe_dist else 0.0),
             '--sched', 'cosine' if args.cos else 'step', *STUDENT] + (['--robust'] if args.robust else [])
    return select, train + extra


def main(argv=None) -> dict:
    args, extra = get_args_parser().parse_known_args(argv)
    select, train = translate(args, extra)
    select_wild_data.main(select_wild_data.get_args_parser().parse_args(select))
    return main_finetune.run(train)


if __name__ == '__main__':
    main(sys.argv[1:])
