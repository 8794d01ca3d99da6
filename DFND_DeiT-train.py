"""The Attention Probe reference's command lines, unchanged: its flags mapped onto this project's two steps.

Every probe command of the reference's README and scripts (CIFAR-10, CIFAR-100, and the Tiny-ImageNet and
ImageNet lines its scripts give to DFND_DeiT-imagenet.py) runs here as written, e.g.

    python DFND_DeiT-train.py --dataset cifar10 --data_cifar $root_cifar10 --data_imagenet $root_wild \\
        --num_select 650000 --teacher_dir $teacher --selected_file $selected --output_dir $out \\
        --nb_classes 10 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist

runs

    select_wild_data.py --teacher $teacher --wild_path $root_wild --num_select 650000 \\
        --output ${selected}selection.pth --nb_classes 10 --score output --attnlier 0.05 --outlier 0.9
    main_finetune.py --mode probe --finetune $teacher --selection ${selected}selection.pth \\
        --eval_data_path $root_cifar10 --nb_classes 10 --lr 7.5e-4 --output_dir ${out}student \\
        --log_dir ${out}student --teacher_acc 0.9665 --patchattn 0.8 --sched step --save_best \\
        --input_size 32 --student_model vit_tiny_patch16_224 --student_kwargs patch_size=4 embed_dim=128 num_heads=2

(``translate`` is the whole mapping; docs/PROBE.md has the table). A teacher checkpoint of this project records
its architecture; one in the reference's format (a timm DeiT/ViT state dict under 'model') is built as
--teacher names it, the reference's default deit_base_patch4_32_teacher when not given. Everything else comes
from the two scripts' probe defaults, which are the reference's: AdamW with weight decay 0.025 on every
parameter, batch 256, class-token models, epochs from the image presentations, x0.1 at epochs 200 and 300.
--dataset imagenet and tinyimagenet follow the reference's DFND_DeiT-imagenet.py: 224x224 input, a DeiT-tiny
student, twice the presentations, and the first --pos_num originals of each class mixed into the selection.

Every flag is checked before the selection scores an image: this script's, main_finetune.py's own checks of
the training flags, and the teacher and student architectures (built without weights). Like the reference,
a rerun reuses the scores already computed; a rerun into the student folder of a stopped run is refused
before the selection unless --resume allow (passed on to main_finetune.py) continues it. --data_cifar must
be the ImageFolder layout that tools/prepare_cifar.py writes (train/ and val/), where the reference reads
CIFAR's own files. Flags this script does not know are passed on to main_finetune.py (e.g. --batch_size,
--save_every).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import NamedTuple

import main_finetune
import select_wild_data
from modes import IMAGENET_PROBE_PRESENTATIONS, PROBE_PRESENTATIONS
from util.args import HelpFormatter, Parser, explicit_flags
from util.config import Config
from util.errors import UserError, run_cli
from util.model_record import classifier_of
from util.pretrained import local_checkpoint
from util.run_control import reporting_stop
from util.selection import labelled_originals

# The reference's CIFAR student: 32x32 input, 4x4 patches, width 128, 12 blocks, 2 heads, MLP ratio 4.
CIFAR_STUDENT = ('--student_model', 'vit_tiny_patch16_224', '--student_kwargs', 'patch_size=4', 'embed_dim=128',
                 'num_heads=2')
# Its ImageNet student: DeiT-tiny (width 192, 12 blocks, 3 heads, 16x16 patches at 224x224).
DEIT_TINY_STUDENT = ('--student_model', 'vit_tiny_patch16_224')


class Recipe(NamedTuple):
    """What the reference fixes per --dataset."""

    teacher_acc: float    # its hard-coded teacher accuracy: the diagonal of the noise transition
    input_size: int
    student: tuple[str, ...]  # main_finetune.py's student flags
    presentations: int    # the budget: int(presentations / num_select) - 1 epochs
    pos_num: int          # labelled originals per class by default (only its ImageNet script has them)


RECIPES = {
    'cifar10': Recipe(0.9665, 32, CIFAR_STUDENT, PROBE_PRESENTATIONS, 0),
    'cifar100': Recipe(0.7630, 32, CIFAR_STUDENT, PROBE_PRESENTATIONS, 0),
    'imagenet': Recipe(0.8118, 224, DEIT_TINY_STUDENT, IMAGENET_PROBE_PRESENTATIONS, 129),
    'tinyimagenet': Recipe(0.8118, 224, DEIT_TINY_STUDENT, IMAGENET_PROBE_PRESENTATIONS, 129),
}

# The teachers the reference registers (its vision_transformer.py): timm ViTs that classify from the class
# token, here as timm names and arguments. Other --teacher names are timm's own (e.g. deit_base_patch16_224,
# which the reference re-registers with the same architecture).
REFERENCE_TEACHERS = {
    'deit_tiny_patch4_32_teacher': ('vit_tiny_patch16_224', ('patch_size=4', 'embed_dim=128', 'num_heads=2')),
    'deit_small_patch4_32_teacher': ('vit_tiny_patch16_224', ('patch_size=4', 'num_heads=2')),
    'deit_base_patch4_32_teacher': ('vit_small_patch16_224', ('patch_size=4', 'num_heads=3')),
}
DEFAULT_TEACHER = 'deit_base_patch4_32_teacher'

# This project's flags that both steps take, passed to both when given.
SHARED = ('device', 'num_workers', 'seed', 'amp', 'mean', 'std')


def get_args_parser() -> argparse.ArgumentParser:
    # no abbreviations: a flag this script does not define goes to main_finetune.py as it is written (with them,
    # main_finetune.py's --sched would be taken for --schedule, as the reference's parser takes --teacher for
    # --teacher_dir)
    p = argparse.ArgumentParser('python DFND_DeiT-train.py', description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group('the reference\'s flags')
    g.add_argument('--dataset', default='cifar10', choices=list(RECIPES),
                   help='target task: its teacher accuracy (cifar10 0.9665, cifar100 0.7630, imagenet and '
                        'tinyimagenet 0.8118, as the reference hard-codes them) -> --teacher_acc; imagenet and '
                        'tinyimagenet take the recipe of the reference\'s DFND_DeiT-imagenet.py (see above)')
    g.add_argument('--data_cifar', required=True, default=argparse.SUPPRESS,
                   help='target task folder with train/ and val/ (for CIFAR as tools/prepare_cifar.py writes it) '
                        '-> main_finetune.py --eval_data_path')
    g.add_argument('--data_imagenet', required=True, default=argparse.SUPPRESS,
                   help='the wild image folder -> select_wild_data.py --wild_path')
    g.add_argument('--num_select', default=600000, type=int,
                   help='wild images to keep -> --num_select (default: %(default)s, the reference\'s; its scripts '
                        'pass 650000, 800000 and 1000000)')
    g.add_argument('--teacher', default=None, metavar='ARCH',
                   help='the teacher\'s architecture, for a checkpoint in the reference\'s format: one the '
                        f'reference registers ({", ".join(REFERENCE_TEACHERS)}) or a timm name (e.g. '
                        'deit_base_patch16_224), class-token pooling -> select_wild_data.py --model, '
                        'main_finetune.py --teacher_model (default: the architecture a checkpoint of this project '
                        f'records, else the reference\'s {DEFAULT_TEACHER})')
    g.add_argument('--teacher_dir', required=True, default=argparse.SUPPRESS,
                   help='the teacher checkpoint (a file, as in the reference) -> --teacher / --finetune')
    g.add_argument('--nb_classes', default=10, type=int, help='classes of the target task -> --nb_classes')
    g.add_argument('--lr_S', default=7.5e-4, type=float, help='student learning rate -> --lr')
    g.add_argument('--robust', action='store_true', help='class-balance weighted KD -> --robust')
    g.add_argument('--attnprobe_sel', action='store_true',
                   help='rank by the output score alone, as the released code does -> --score output '
                        '(without it: the combination, --score combined)')
    g.add_argument('--random', action='store_true', help='random selection baseline -> --random')
    g.add_argument('--attnprobe_dist', action='store_true',
                   help='add the patch attention probe loss -> --patchattn PATCHATTN (without it: --patchattn 0)')
    g.add_argument('--attnlier', default=0.05, type=float, help='-> select_wild_data.py --attnlier')
    g.add_argument('--outlier', default=0.9, type=float, help='-> select_wild_data.py --outlier')
    g.add_argument('--patchattn', default=0.8, type=float, help='-> main_finetune.py --patchattn')
    g.add_argument('--pos_num', default=None, type=int, metavar='N',
                   help='mix the first N images of each class of --data_cifar/train into the selection -> '
                        'main_finetune.py --pos_num (default: 129 for imagenet and tinyimagenet, as the '
                        'reference\'s DFND_DeiT-imagenet.py; none for CIFAR, whose reference script has no such flag)')
    g.add_argument('--epochs', default=None, type=int,
                   help='the reference parses this flag and ignores it (its budget is always the image '
                        'presentations); here it replaces that budget -> main_finetune.py --epochs (default: '
                        'the budget)')
    g.add_argument('--output_dir', required=True, default=argparse.SUPPRESS,
                   help='the student goes to OUTPUT_DIR + "student", the string appended as the reference does '
                        '(/out/cifar10/ -> /out/cifar10/student, /out/cifar10 -> /out/cifar10student) -> '
                        '--output_dir and --log_dir')
    g.add_argument('--selected_file', required=True, default=argparse.SUPPRESS,
                   help='prefix of the selection files, appended to as the reference does (e.g. selected/cifar10/): '
                        'the selection is written to SELECTED_FILE + "selection.pth"')
    g.add_argument('--schedule', default=None, type=int, nargs='*', metavar='EPOCH',
                   help='epochs (counted from 1) from which the lr is multiplied by 0.1 -> --step_epochs '
                        '(default: 200 300, the reference\'s; given without epochs: a constant lr, --step_rate 1)')
    g.add_argument('--cos', action='store_true', help='cosine lr schedule -> --sched cosine (default: step)')
    g = p.add_argument_group('this project\'s flags for both steps (the others go to main_finetune.py)')
    g.add_argument('--device', default=None, help='-> both steps\' --device (default: cuda when available)')
    g.add_argument('--num_workers', default=None, type=int,
                   help='-> both steps\' --num_workers (default: each step\'s own)')
    g.add_argument('--seed', default=None, type=int,
                   help='-> both steps\' --seed, the --random baseline\'s too (default: each step\'s own, 0)')
    g.add_argument('--amp', default=None, choices=['bf16', 'none'],
                   help='-> both steps\' --amp (default: bf16 on CUDA; the reference computes in float32: none)')
    g.add_argument('--mean', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='-> both steps\' --mean (default: the teacher\'s as its checkpoint records it, else '
                        'ImageNet\'s)')
    g.add_argument('--std', default=None, type=float, nargs=3, metavar=('R', 'G', 'B'),
                   help='-> both steps\' --std (default: as --mean)')
    return p


def teacher_flags(args: argparse.Namespace) -> tuple[str, tuple[str, ...]] | None:
    """The teacher's timm name and arguments, or None when its checkpoint records them (this project's)."""
    name = args.teacher
    if name is None:
        local_checkpoint(args.teacher_dir, '--teacher_dir')
        if classifier_of(args.teacher_dir) is not None:
            return None
        name = DEFAULT_TEACHER
    return REFERENCE_TEACHERS.get(name, (name, ()))


def translate(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], list[str]]:
    """The argument lists of select_wild_data.py and main_finetune.py for the reference's flags."""
    recipe = RECIPES[args.dataset]
    selection = args.selected_file + 'selection.pth'  # the reference appends its file names to the prefix
    student_dir = args.output_dir + 'student'  # the reference saves to output_dir + 'student/' + 'checkpoint.pth'
    shared = []
    for key in SHARED:
        value = getattr(args, key)
        if value is not None:
            shared += [f'--{key}', *map(str, value if isinstance(value, list) else [value])]
    teacher = teacher_flags(args)
    select = ['--teacher', args.teacher_dir, '--wild_path', args.data_imagenet, '--num_select', str(args.num_select),
              '--output', selection, '--nb_classes', str(args.nb_classes),
              '--score', 'output' if args.attnprobe_sel else 'combined',
              '--attnlier', str(args.attnlier), '--outlier', str(args.outlier)]
    train = ['--mode', 'probe', '--finetune', args.teacher_dir, '--selection', selection,
             '--eval_data_path', args.data_cifar, '--nb_classes', str(args.nb_classes), '--lr', str(args.lr_S),
             '--output_dir', student_dir, '--log_dir', student_dir, '--teacher_acc', str(recipe.teacher_acc),
             '--patchattn', str(args.patchattn if args.attnprobe_dist else 0.0),
             '--sched', 'cosine' if args.cos else 'step', '--save_best', '--input_size', str(recipe.input_size),
             *recipe.student]
    if teacher is not None:
        name, kwargs = teacher
        kwargs = ['--model_kwargs', *kwargs] if kwargs else []
        select += ['--model', name, *kwargs, '--input_size', str(recipe.input_size), '--cls_token']
        train += ['--teacher_model', name, *kwargs]
    if args.random:
        select.append('--random')
    if args.robust:
        train.append('--robust')
    if recipe.presentations != PROBE_PRESENTATIONS:
        train += ['--presentations', str(recipe.presentations)]
    pos_num = recipe.pos_num if args.pos_num is None else args.pos_num
    if pos_num:
        train += ['--pos_num', str(pos_num)]
    if args.schedule is not None:
        train += ['--step_epochs', *map(str, args.schedule)] if args.schedule else ['--step_rate', '1']
    if args.epochs is not None:
        train += ['--epochs', str(args.epochs)]
    return select + shared, train + shared + extra


def check(select: list[str], train: list[str]) -> argparse.Namespace:
    """Everything that can be checked before the selection: both argument lists parse, main_finetune.py's
    checks of the training flags pass (the selection counts as written), --data_cifar has the layout, and
    the teacher and student architectures are built (without weights: on the meta device) and fit together.
    Returns the selection's arguments."""
    select_args = select_wild_data.get_args_parser().parse_args(select)
    select_wild_data.check_num_select(select_args.num_select)
    if not os.path.isdir(select_args.wild_path):
        raise UserError(f"--data_imagenet {select_args.wild_path!r}: not a directory; give the wild image folder "
                        "(e.g. ImageNet's train/)")
    parser = Parser(parents=[main_finetune.get_args_parser()])
    args, unknown = parser.parse_known_args(train)
    if unknown:
        raise UserError(f"unrecognised arguments: {' '.join(unknown)}. This script passes the flags it does not "
                        "define to main_finetune.py, which does not define these either: see python "
                        "DFND_DeiT-train.py --help and python main_finetune.py --help")
    args = Config.of(args, explicit_flags=explicit_flags(parser, train), selection_pending=True)
    for split in ['val'] + (['train'] if args.pos_num else []):
        if not os.path.isdir(os.path.join(args.eval_data_path, split)):
            raise UserError(f"--data_cifar {args.eval_data_path!r} has no {split}/ folder: give the target task in "
                            "the ImageFolder layout (train/<class>/, val/<class>/; CIFAR's python files convert with "
                            "python tools/prepare_cifar.py --src cifar-10-batches-py --dst data/cifar10)")
    check_pos_num(args)
    main_finetune.resolve_args(args)  # describes the model too: an incompatible pair is refused here
    return select_args


def check_reference_flags(args: argparse.Namespace) -> None:
    """This script's own numeric flags, named as the user gave them (before they become main_finetune.py's)."""
    if not (math.isfinite(args.lr_S) and args.lr_S > 0):
        raise UserError(f"--lr_S {args.lr_S:g}: the student's learning rate must be > 0 (the reference's is 7.5e-4)")
    if args.nb_classes < 1:
        raise UserError(f"--nb_classes {args.nb_classes}: must be >= 1, the number of classes of the target task "
                        "(and of the teacher's head): 10 for CIFAR-10, 100 for CIFAR-100, 1000 for ImageNet")


def check_pos_num(train_args: argparse.Namespace) -> None:
    """--pos_num's originals (default 129 a class for imagenet and tinyimagenet) must exist in every class of the
    target task's training split: listed now, not after the selection has scored the wild images."""
    if train_args.pos_num:
        labelled_originals(os.path.join(train_args.eval_data_path, 'train'), train_args.pos_num)


def main(argv=None) -> dict:
    args, extra = get_args_parser().parse_known_args(argv)
    check_reference_flags(args)
    select, train = translate(args, extra)
    select_args = check(select, train)
    select_wild_data.main(select_args)
    return reporting_stop(main_finetune.run, train)  # a stop: one line, the signal's exit status


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
