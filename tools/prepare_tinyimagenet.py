"""Reorganise Tiny-ImageNet's validation folder by class, so that it reads as an ImageFolder.

    python tools/prepare_tinyimagenet.py --data_path tiny-imagenet-200

Tiny-ImageNet ships ``train/<wnid>/images/*.JPEG`` (already one folder per class) but
``val/images/*.JPEG`` with the labels in ``val/val_annotations.txt``. This moves every validation
image to ``val/<wnid>/`` and removes the emptied ``val/images``. Running it again does nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.args import HelpFormatter  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402


def read_annotations(path: str) -> dict[str, str]:
    """file name -> wnid, from val_annotations.txt (tab separated: file, wnid, box)."""
    labels = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split('\t')
            if len(parts) >= 2:
                labels[parts[0]] = parts[1]
    return labels


def reorganise_val(data_path: str) -> int:
    """Move val/images/<file> to val/<wnid>/<file>; returns the number of images moved."""
    val = os.path.join(data_path, 'val')
    images = os.path.join(val, 'images')
    annotations = os.path.join(val, 'val_annotations.txt')
    if not os.path.isdir(images):
        if os.path.isdir(val) and any(os.path.isdir(os.path.join(val, d)) for d in os.listdir(val)):
            return 0  # already reorganised
        raise UserError(f"--data_path {data_path!r}: {images!r} not found; give the extracted tiny-imagenet-200 "
                        "folder")
    if not os.path.isfile(annotations):
        raise UserError(f"--data_path {data_path!r}: {annotations!r} not found; it holds the validation labels "
                        "(extract tiny-imagenet-200 again)")
    labels = read_annotations(annotations)
    moved = 0
    for name in sorted(os.listdir(images)):
        if name not in labels:
            raise UserError(f"{name} in {images} has no line in {annotations}; extract tiny-imagenet-200 again")
        folder = os.path.join(val, labels[name])
        os.makedirs(folder, exist_ok=True)
        shutil.move(os.path.join(images, name), os.path.join(folder, name))
        moved += 1
    os.rmdir(images)
    return moved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser('python tools/prepare_tinyimagenet.py', description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument('--data_path', required=True, help='the extracted tiny-imagenet-200 folder')
    args = parser.parse_args(argv)
    moved = reorganise_val(args.data_path)
    print(f"moved {moved} validation images into class folders under {os.path.join(args.data_path, 'val')}"
          if moved else "val/ is already organised by class")


if __name__ == '__main__':
    run_cli(main)
