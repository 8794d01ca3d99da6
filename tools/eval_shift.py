"""Evaluate one checkpoint on the ImageNet distribution-shift sets in one go, and write one table.

    python tools/eval_shift.py --output_dir shift/ \\
        --imagenet_a ~/data/imagenet-a --imagenet_r ~/data/imagenet-r \\
        --imagenet_sketch ~/data/imagenet-sketch/sketch --imagenet_v2 ~/data/imagenetv2-matched-frequency \\
        --resume runs/distill/checkpoint.pth --batch_size 256

Give any of the four sets. Each is a folder with one folder of images per class, as the sets are distributed:
WordNet ids (ImageNet-A, -R, -Sketch) or ImageNet-1k class indices 0 to 999 (ImageNetV2). The checkpoint is an
ImageNet-1k classifier; ImageNet-A and -R are scored by its logits of their 200 classes (--eval_classes
imagenet-a / imagenet-r), the others by all 1000. Every flag the tool does not know goes to main_finetune.py
--eval (--resume CKPT or --finetune CKPT, --batch_size, --device ...).

Writes, per set, output_dir/<set>/eval_results.json (as main_finetune.py --eval does; the set's class folders
are linked under output_dir/<set>/data/val/<wnid>, in ImageNet-1k's order), and the table of all of them as
output_dir/shift_results.json and output_dir/shift_results.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_finetune  # noqa: E402
from util.args import HelpFormatter  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.eval_classes import imagenet_synsets, read_eval_classes  # noqa: E402
from util.model_record import classifier_of  # noqa: E402
from util.output import EVAL_RESULTS  # noqa: E402

# flag -> (the set's name, its --eval_classes: None scores all 1000 classes)
SETS = {
    'imagenet_a': ('ImageNet-A', 'imagenet-a'),
    'imagenet_r': ('ImageNet-R', 'imagenet-r'),
    'imagenet_sketch': ('ImageNet-Sketch', None),
    'imagenet_v2': ('ImageNetV2', None),
}
# main_finetune.py flags that the tool sets for each set
OWN_FLAGS = ('--data_path', '--eval_data_path', '--output_dir', '--eval_classes', '--log_dir')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('python tools/eval_shift.py', description=__doc__, formatter_class=HelpFormatter)
    for flag, (name, classes) in SETS.items():
        p.add_argument(f'--{flag}', default='', metavar='DIR',
                       help=f'{name}: a folder of class folders' + (f' (scored on --eval_classes {classes})'
                                                                     if classes else ''))
    p.add_argument('--output_dir', required=True, help='where each set\'s results and the table go')
    return p


def class_links(flag: str, source: str) -> dict[str, str]:
    """{WordNet id: class folder} for every class folder of ``source`` (named by WordNet id or ImageNet-1k index);
    reads only."""
    synsets = imagenet_synsets()
    known = set(synsets)
    folders = sorted(name for name in os.listdir(source) if os.path.isdir(os.path.join(source, name)))
    if not folders:
        raise UserError(f"--{flag} {source!r} holds no class folder: give the folder whose subfolders are the classes")
    links: dict[str, str] = {}
    for name in folders:
        if name.isdigit() and int(name) < len(synsets):
            wnid = synsets[int(name)]
        elif name in known:
            wnid = name
        else:
            raise UserError(f"--{flag} {source!r}: the class folder {name!r} is neither an ImageNet-1k WordNet id "
                            "(n01440764) nor a class index 0-999; give the set's folder as it is distributed")
        if wnid in links:
            raise UserError(f"--{flag} {source!r}: the class folders {os.path.basename(links[wnid])!r} and {name!r} "
                            f"are both class {wnid}; give the set's folder as it is distributed")
        links[wnid] = os.path.abspath(os.path.join(source, name))
    return links


def check_set_classes(flag: str, source: str, links: dict[str, str]) -> None:
    """The set's class folders are its classes: ImageNet-A's or -R's 200 (their --eval_classes), all 1000 of
    ImageNet-1k for the others."""
    name, classes = SETS[flag]
    expected = set(read_eval_classes(classes, 1000).synsets) if classes else set(imagenet_synsets())
    if set(links) != expected:
        missing, extra = sorted(expected - set(links))[:3], sorted(set(links) - expected)[:3]
        raise UserError(f"--{flag} {source!r}: {len(links)} class folders, but {name} has {len(expected)} (missing "
                        f"{missing}, not of {name} {extra}); give the set's folder as it is distributed")


def link_classes(links: dict[str, str], view: str) -> None:
    """``view/<wnid>`` -> its class folder for every entry of ``links``, so that the sorted folder names follow
    ImageNet-1k's class order. Old links are replaced."""
    os.makedirs(view, exist_ok=True)
    for name in os.listdir(view):
        if os.path.islink(os.path.join(view, name)):
            os.unlink(os.path.join(view, name))
    for wnid, folder in links.items():
        os.symlink(folder, os.path.join(view, wnid))


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), None without it."""
    value = None
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif item.startswith(flag + '='):
            value = item[len(flag) + 1:]
    return value


def check_classifier(rest: list[str]) -> None:
    """The checkpoint must be an ImageNet-1k classifier (1000 classes): the sets' folders are its classes. A
    --resume checkpoint's class count is its own, which no flag changes; one that records none is left to
    main_finetune.py to check."""
    nb_classes = flag_value(rest, '--nb_classes')
    if nb_classes is not None and nb_classes != '1000':
        raise UserError(f"--nb_classes {nb_classes}: the shift sets are scored by an ImageNet-1k classifier's 1000 "
                        "classes (ImageNet-A and -R by 200 of them); leave --nb_classes out")
    flag = '--resume' if flag_value(rest, '--resume') is not None else '--finetune'
    path = flag_value(rest, flag)
    if path is None or not os.path.isfile(path):
        return
    spec = classifier_of(path)
    if spec is not None and spec.num_classes != 1000:
        raise UserError(f"{flag} {path}: a classifier of {spec.num_classes} classes, but the shift sets are scored "
                        "by an ImageNet-1k classifier's 1000 classes (ImageNet-A and -R by 200 of them); give the "
                        "checkpoint of an ImageNet-1k classifier (a run of this project on ImageNet-1k, or "
                        "--finetune timm:NAME)")


def row_of(name: str, stats: dict) -> dict:
    row = {'set': name, 'images': stats.get('test_images'), 'acc1': stats['test_acc1'], 'acc5': stats['test_acc5']}
    if 'ema_test_acc1' in stats:
        row.update(ema_acc1=stats['ema_test_acc1'], ema_acc5=stats['ema_test_acc5'])
    return row


def write_table(output_dir: str, rows: list[dict], command: str) -> None:
    date = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    machine = platform.node()
    with open(os.path.join(output_dir, 'shift_results.json'), 'w') as f:
        json.dump({'command': command, 'machine': machine, 'date': date, 'results': rows}, f, indent=1)
    ema = any('ema_acc1' in r for r in rows)
    lines = [f"Command: `{command}`", f"Machine: {machine}, {date}", '',
             '| set | images | top-1 | top-5 |' + (' EMA top-1 | EMA top-5 |' if ema else ''),
             '| --- | ---: | ---: | ---: |' + (' ---: | ---: |' if ema else '')]
    for r in rows:
        line = f"| {r['set']} | {r['images']} | {r['acc1']:.2f} | {r['acc5']:.2f} |"
        if ema:
            line += f" {r.get('ema_acc1', float('nan')):.2f} | {r.get('ema_acc5', float('nan')):.2f} |"
        lines.append(line)
    with open(os.path.join(output_dir, 'shift_results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None) -> list[dict]:
    args, rest = get_args_parser().parse_known_args(argv)
    chosen = [(flag, getattr(args, flag)) for flag in SETS if getattr(args, flag)]
    if not chosen:
        raise UserError("give at least one set: --imagenet_a, --imagenet_r, --imagenet_sketch or --imagenet_v2 DIR")
    for flag, root in chosen:
        if not os.path.isdir(root):
            raise UserError(f"--{flag} {root!r}: not a folder; give the set's folder of class folders")
    taken = [f for f in rest if f.split('=')[0] in OWN_FLAGS]
    if taken:
        raise UserError(f"{' '.join(taken)}: set by the tool for each set; give --output_dir to the tool and the "
                        "sets by their own flags")
    if not any(f.split('=')[0] in ('--resume', '--finetune') for f in rest):
        raise UserError("give the checkpoint to evaluate: --resume CKPT (a run of this project) or --finetune CKPT "
                        "(an ImageNet-1k classifier, e.g. timm:NAME)")
    check_classifier(rest)
    links = {flag: class_links(flag, root) for flag, root in chosen}  # every set checked before any is evaluated
    for flag, root in chosen:
        check_set_classes(flag, root, links[flag])
    rows = []
    for flag, _ in chosen:
        name, classes = SETS[flag]
        out = os.path.join(args.output_dir, flag)
        link_classes(links[flag], os.path.join(out, 'data', 'val'))
        stats = main_finetune.run([*rest, '--eval', '--data_path', os.path.join(out, 'data'), '--output_dir', out]
                                  + (['--eval_classes', classes] if classes else []))
        with open(os.path.join(out, EVAL_RESULTS)) as f:
            stats = {**json.load(f), **stats}
        rows.append(row_of(name, stats))
    command = 'python tools/eval_shift.py ' + shlex.join(argv if argv is not None else sys.argv[1:])
    write_table(args.output_dir, rows, command)
    print(open(os.path.join(args.output_dir, 'shift_results.md')).read())
    return rows


if __name__ == '__main__':
    run_cli(main)
