"""--eval_classes: a classifier's logits restricted to a subset of its classes (ImageNet-A and -R are 200-class
subsets of ImageNet-1k; their images are scored by the 1000-class model's logits of those 200 classes).

The subsets come from timm's own ImageNet metadata: the synsets of ImageNet-1k through its public
``ImageNetInfo``, and the 200-class lists that timm ships beside them (``timm/data/_info/imagenet_{a,r}_*.txt``,
read with pkgutil: timm has no public function for them; ``subset_file`` is the one place that reads them).
"""
from __future__ import annotations

import os
import pkgutil
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.data import ImageNetInfo

from util.datasets import DataSettings, build_dataset
from util.distributed import log
from util.errors import UserError

# --eval_classes names and the stem of timm's files for them
NAMED_SUBSETS = {'imagenet-a': 'imagenet_a', 'imagenet-r': 'imagenet_r'}


def subset_file(stem: str, kind: str) -> list[str]:
    """The lines of timm's ``_info/{stem}_{kind}.txt`` (kind: ``indices`` or ``synsets``)."""
    data = pkgutil.get_data('timm.data', os.path.join('_info', f'{stem}_{kind}.txt'))
    return [line.strip() for line in data.decode('utf-8').splitlines() if line.strip()]


def imagenet_synsets() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids in the order of its classifiers' logits (timm's ImageNetInfo)."""
    return list(ImageNetInfo('imagenet-1k').label_names())


@dataclass(frozen=True)
class ClassSubset:
    """Logit columns (``indices``, in the order of the evaluation set's sorted class folders) and, where known,
    the WordNet ids of those classes."""
    indices: tuple[int, ...]
    synsets: tuple[str, ...] | None = None


def read_eval_classes(spec: str, num_classes: int) -> ClassSubset:
    """--eval_classes: ``imagenet-a`` / ``imagenet-r`` (timm's 200-class lists), or a FILE with one class a line,
    in the order of the evaluation set's sorted class folders: a WordNet id of ImageNet-1k (n01498041) or a
    logit index (0 to num_classes - 1)."""
    if spec in NAMED_SUBSETS:
        stem = NAMED_SUBSETS[spec]
        indices = [int(i) for i in subset_file(stem, 'indices')]
        synsets = subset_file(stem, 'synsets')
        pairs = sorted(zip(synsets, indices))  # ImageFolder labels the folders in sorted order
        subset = ClassSubset(tuple(i for _, i in pairs), tuple(s for s, _ in pairs))
    elif os.path.isfile(spec):
        subset = read_class_file(spec)
    else:
        raise UserError(f"--eval_classes {spec!r}: neither {' nor '.join(NAMED_SUBSETS)} nor a file; give one of "
                        "those names, or a file with one WordNet id or logit index a line")
    if subset.synsets is not None and num_classes != 1000:
        raise UserError(f"--eval_classes {spec}: names ImageNet-1k classes, but the model has {num_classes} classes "
                        "(the mask picks logits of a 1000-class ImageNet classifier)")
    bad = [i for i in subset.indices if not 0 <= i < num_classes]
    if bad:
        raise UserError(f"--eval_classes {spec}: logit indices {bad[:5]} lie outside the model's {num_classes} classes")
    return subset


def read_class_file(path: str) -> ClassSubset:
    """The classes of an --eval_classes FILE, one a line (a byte-order mark, blank lines and # comments
    ignored); each class once."""
    with open(path, encoding='utf-8-sig') as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    if not lines:
        raise UserError(f"--eval_classes {path}: the file names no class (one WordNet id or logit index a line)")
    check_named_once(lines, path)
    if all(line.isdigit() for line in lines):
        return ClassSubset(tuple(int(line) for line in lines))
    synsets = imagenet_synsets()
    position = {s: i for i, s in enumerate(synsets)}
    unknown = [line for line in lines if line not in position]
    if unknown:
        raise UserError(f"--eval_classes {path}: {unknown[:3]} are neither ImageNet-1k WordNet ids nor logit indices")
    return ClassSubset(tuple(position[line] for line in lines), tuple(lines))


def check_named_once(lines: list[str], path: str) -> None:
    """Each class once: line k scores the k-th class folder, so a class named twice would score two folders by
    one logit. (Line numbers count the class lines.)"""
    first: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        key = str(int(line)) if line.isdigit() else line
        if key in first:
            raise UserError(f"--eval_classes {path}: {line} is named twice (lines {first[key]} and {number}); "
                            "each line scores one class folder of the evaluation set, so name each class once")
        first[key] = number


def check_class_folders(folders: list[str], subset: ClassSubset, spec: str, root: str) -> None:
    """The evaluation set's sorted class folders must be the subset's classes, one for one and in that order: by
    WordNet id where both have them, else by count."""
    if len(folders) != len(subset.indices):
        raise UserError(f"{root!r} has {len(folders)} class folders, but --eval_classes {spec} names "
                        f"{len(subset.indices)} classes: give the folder of that evaluation set")
    if subset.synsets is not None and folders != list(subset.synsets) and set(folders) & set(imagenet_synsets()):
        if sorted(subset.synsets) == folders:
            line, (named, folder) = next((k, pair) for k, pair in enumerate(zip(subset.synsets, folders), start=1)
                                         if pair[0] != pair[1])
            raise UserError(f"--eval_classes {spec}: names the class folders of {root!r} in another order (line "
                            f"{line} names {named}, but sorted class folder {line} is {folder}); line k scores "
                            f"the k-th class folder in sorted order, so sort the lines (e.g. sort {spec} -o {spec})")
        missing = sorted(set(subset.synsets) - set(folders))[:3]
        extra = sorted(set(folders) - set(subset.synsets))[:3]
        raise UserError(f"{root!r}: its class folders are not the classes of --eval_classes {spec} (missing "
                        f"{missing}, not in the subset {extra}): give the folder of that evaluation set")


class RestrictedClassifier(nn.Module):
    """A classifier whose logits are those of ``indices`` alone (an ImageNet-1k model scored on ImageNet-A's 200
    classes: the argmax runs over those 200 logits). ``with_student`` keeps the restriction around another
    student (the EMA's evaluation)."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer('indices', torch.tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.indices]

    def with_student(self, student: nn.Module) -> RestrictedClassifier:
        return RestrictedClassifier(self.model.with_student(student), tuple(self.indices.tolist())).to(
            self.indices.device)


def build_eval_dataset(data: DataSettings):
    """The evaluation set: --eval_data_path/val, whose class folders are the model's classes or, with
    --eval_classes, those of the subset."""
    root = os.path.join(data.eval_data_path, 'val')
    if not data.eval_classes:
        return build_dataset(False, data, root=root)
    subset = read_eval_classes(data.eval_classes, data.nb_classes)
    dataset = build_dataset(False, data, root=root, nb_classes=len(subset.indices))
    check_class_folders(dataset.classes, subset, data.eval_classes, root)
    return dataset


def restrict_classes(model: nn.Module, eval_classes: str, nb_classes: int) -> nn.Module:
    """The model scored on ``eval_classes`` (--eval_classes) of its ``nb_classes`` alone (the model itself
    without)."""
    if not eval_classes:
        return model
    subset = read_eval_classes(eval_classes, nb_classes)
    log(f"--eval_classes {eval_classes}: logits restricted to {len(subset.indices)} of {nb_classes} classes")
    return RestrictedClassifier(model, subset.indices).to(next(model.parameters()).device)
