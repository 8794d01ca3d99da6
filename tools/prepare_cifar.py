"""Convert the CIFAR-10 / CIFAR-100 python pickles into the ImageFolder layout, as PNG files.

    python tools/prepare_cifar.py --src cifar-10-batches-py --dst data/cifar10
    python tools/prepare_cifar.py --src cifar-100-python --dst data/cifar100

writes ``dst/train/<class>/<index>.png`` (the training batches) and ``dst/val/<class>/<index>.png``
(the test batch). The version is recognised from the files: CIFAR-10 has data_batch_1..5,
test_batch and batches.meta; CIFAR-100 has train, test and meta (fine labels are used). Class
folders are named after the classes; where sorting the names would change the label order, the
folders get a zero-padded label prefix, so ImageFolder's class indices equal CIFAR's labels.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from util.args import HelpFormatter  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

CIFAR10 = dict(train=[f'data_batch_{i}' for i in range(1, 6)], val=['test_batch'], meta='batches.meta',
               names=b'label_names', labels=b'labels')
CIFAR100 = dict(train=['train'], val=['test'], meta='meta', names=b'fine_label_names', labels=b'fine_labels')


def _unpickle(path: str) -> dict:
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='bytes')


def detect(src: str) -> dict:
    for layout in (CIFAR10, CIFAR100):
        if all(os.path.isfile(os.path.join(src, name)) for name in layout['train'] + layout['val'] + [layout['meta']]):
            return layout
    raise UserError(
        f"--src {src!r} is neither cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta) nor "
        "cifar-100-python (train, test, meta); download and extract the python version of CIFAR first")


def class_folders(names: list[str]) -> list[str]:
    """Folder name per label, prefixed with the label where plain names would sort out of label order."""
    if names == sorted(names):
        return names
    width = len(str(len(names) - 1))
    return [f'{i:0{width}d}_{n}' for i, n in enumerate(names)]


def convert(src: str, dst: str) -> dict[str, int]:
    """Write the PNGs; returns the number of images per split."""
    layout = detect(src)
    names = [n.decode() for n in _unpickle(os.path.join(src, layout['meta']))[layout['names']]]
    folders = class_folders(names)
    counts = {}
    for split in ('train', 'val'):
        for folder in folders:
            os.makedirs(os.path.join(dst, split, folder), exist_ok=True)
        index = 0
        for batch_name in layout[split]:
            batch = _unpickle(os.path.join(src, batch_name))
            images = np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label in zip(images, batch[layout['labels']]):
                Image.fromarray(image).save(os.path.join(dst, split, folders[label], f'{index:05d}.png'))
                index += 1
        counts[split] = index
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser('python tools/prepare_cifar.py', description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument('--src', required=True, help='extracted cifar-10-batches-py or cifar-100-python folder')
    parser.add_argument('--dst', required=True, help='output root; train/ and val/ are created inside')
    args = parser.parse_args(argv)
    counts = convert(args.src, args.dst)
    print(f"wrote {counts['train']} training and {counts['val']} validation images under {args.dst}")


if __name__ == '__main__':
    run_cli(main)
