"""Data: ImageFolder data sets, the MAE transforms, bad-image handling and the samplers.

Layout: ``data_path/train/<class>/*`` and ``data_path/val/<class>/*`` (ImageNet's, and what
``tools/prepare_cifar.py`` / ``tools/prepare_tinyimagenet.py`` write).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Optional

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.errors import UserError

LAYOUT = "data_path/train/<class>/<image> and data_path/val/<class>/<image> (ImageNet's folder layout)"


class DataError(ValueError):
    """A data set that cannot be used as given."""


class RobustImageFolder(datasets.ImageFolder):
    """ImageFolder whose undecodable images are skipped (``None``) with a warning, not raised.

    A single bad JPEG must not end a 200-epoch job; ``collate_skipping_bad`` drops the ``None``
    samples and counts them so that every epoch's log reports how many were skipped.
    """

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping undecodable image {path}: {type(e).__name__}: {e}", stacklevel=1)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; returns (images, targets, number of skipped images)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = torch.utils.data.default_collate(good)
    return images, targets, skipped


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def image_folder(root: str, transform, split: str) -> RobustImageFolder:
    """An ImageFolder at ``root`` with a clear error when it is missing or empty."""
    if not os.path.isdir(root):
        raise DataError(f"{split} data not found: {root!r} is not a directory. Expected the layout {LAYOUT}.")
    if not _has_images(root):
        raise DataError(f"{split} data at {root!r} holds no images ({', '.join(IMG_EXTENSIONS)}). "
                        f"Expected the layout {LAYOUT}.")
    try:
        return RobustImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"{split} data at {root!r}: {e}. Expected the layout {LAYOUT}.") from e


def mae_eval_crop_pct(input_size: int) -> float:
    """MAE's evaluation crop fraction for ImageNet-size inputs: 0.875 up to 224 px, 1.0 above."""
    return 224 / 256 if input_size <= 224 else 1.0


def first_image_size(root: str) -> Optional[tuple[int, int]]:
    """(width, height) of the first image under ``root`` in sorted order, or None if there is none."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMG_EXTENSIONS):
                try:
                    with Image.open(os.path.join(folder, name)) as image:
                        return image.size
                except (OSError, SyntaxError, ValueError):
                    continue
    return None


def default_eval_crop_pct(input_size: int, val_root: str, probe: bool = False) -> float:
    """1.0 in probe mode (the Attention Probe reference evaluates its 32x32 images as they are) and where
    the evaluation images already have the input size; MAE's rule otherwise."""
    if probe or first_image_size(val_root) == (input_size, input_size):
        return 1.0
    return mae_eval_crop_pct(input_size)


def build_transform(is_train: bool, args) -> transforms.Compose:
    """MAE's transforms: RandAugment, random erasing and a bicubic random-resized crop for training;
    for evaluation a bicubic resize to input_size / eval_crop_pct and a centre crop (``args.eval_crop_pct``;
    MAE's rule when unset: 0.875 up to 224 px, no margin above)."""
    if is_train:
        return create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            scale=(getattr(args, 'min_crop_scale', 0.08), 1.0), hflip=getattr(args, 'hflip', 0.5),
            auto_augment=args.aa if args.aa not in (None, '', 'none') else None, interpolation='bicubic',
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop_pct = getattr(args, 'eval_crop_pct', None) or mae_eval_crop_pct(args.input_size)
    return transforms.Compose([
        transforms.Resize(int(args.input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def build_dataset(is_train: bool, args, root: Optional[str] = None) -> RobustImageFolder:
    """``data_path/train`` or ``data_path/val`` with its transform; checks ``--nb_classes``."""
    split = 'train' if is_train else 'val'
    root = root or os.path.join(args.data_path, split)
    dataset = image_folder(root, build_transform(is_train, args), split)
    if args.nb_classes != len(dataset.classes):
        raise DataError(f"{root!r} has {len(dataset.classes)} class folders but --nb_classes is {args.nb_classes}; "
                        f"pass --nb_classes {len(dataset.classes)} (or fix the folders)")
    return dataset


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (the same order for a given seed and epoch) that can start mid-epoch.

    ``set_epoch(epoch, start_index)`` skips this rank's first ``start_index`` samples, so a job
    preempted after k steps resumes at step k without loading the images it already trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, ...: every sample once, none repeated, so that
    summed counts over ranks give exact distributed accuracy."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset: Dataset, sampler: Sampler, args, train: bool, batch_size: Optional[int] = None) -> DataLoader:
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch_size or args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith('cuda'), drop_last=train,
        collate_fn=collate_skipping_bad, persistent_workers=False, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------
# Unlabelled "wild" images (Attention Probe)
# ---------------------------------------------------------------------------------------------
def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (any folder layout; class folders, if any, are ignored), as
    paths relative to ``root`` in a fixed, sorted order."""
    if not os.path.isdir(root):
        raise DataError(f"wild image folder not found: {root!r}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    if not found:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return found


class ImageFiles(Dataset):
    """Images at ``root/<path>`` for the given relative paths; each item is (image, its index).
    An undecodable image gives ``None`` (with a warning), which ``collate_skipping_bad`` drops."""

    def __init__(self, root: str, paths: list[str], transform=None) -> None:
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = os.path.join(self.root, self.paths[index])
        try:
            with open(path, 'rb') as f:
                image = Image.open(f).convert('RGB')
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping undecodable image {path}: {type(e).__name__}: {e}", stacklevel=1)
            return None
        return (self.transform(image) if self.transform is not None else image), index


def labelled_originals(root: str, per_class: int, seed: int) -> list[str]:
    """``per_class`` images of every class folder under ``root`` (an ImageFolder's train split), drawn
    without replacement with a generator seeded by ``seed``; absolute paths, class by class."""
    if not os.path.isdir(root):
        raise UserError(f"--pos_num {per_class}: mixes labelled originals from the target task's training split "
                        f"into the selection, but {root!r} is not a directory; give --eval_data_path a folder "
                        "holding train/<class>/, or drop --pos_num")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        files = sorted(os.path.join(root, cls, f) for f in os.listdir(os.path.join(root, cls))
                       if f.lower().endswith(IMG_EXTENSIONS))
        if len(files) < per_class:
            raise UserError(f"--pos_num {per_class}: class folder {os.path.join(root, cls)!r} holds only "
                            f"{len(files)} images; lower --pos_num to at most {len(files)}")
        chosen += [os.path.abspath(files[i]) for i in torch.randperm(len(files), generator=generator)[:per_class]]
    return chosen


def wild_transform(input_size: int, train: bool, hflip: float = 0.5) -> transforms.Compose:
    """The Attention Probe reference's wild-image transforms: resize to input_size x input_size; for
    training, a random crop with 4 pixels of padding and a horizontal flip with probability ``hflip``."""
    steps = [transforms.Resize((input_size, input_size))]
    if train:
        steps.append(transforms.RandomCrop(input_size, padding=4))
        if hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(hflip))
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
