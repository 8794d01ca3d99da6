"""Data: ImageFolder data sets, the MAE transforms, bad-image handling and the samplers.

Layout: ``data_path/train/<class>/*`` and ``data_path/val/<class>/*`` (ImageNet's, and what
``tools/prepare_cifar.py`` / ``tools/prepare_tinyimagenet.py`` write).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.errors import UserError

LAYOUT = "data_path/train/<class>/<image> and data_path/val/<class>/<image> (ImageNet's folder layout)"


class DataError(UserError):
    """A data set that cannot be used as given."""


# Pillow's modes for 16-bit integer pixels (16-bit grayscale PNGs and TIFFs open as one of these;
# 'I' is 32-bit, but the PNG and TIFF decoders use it for 16-bit samples too).
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image with 8 bits per channel. Pillow's ``convert('RGB')`` clips 16-bit and float pixels
    instead of scaling them (a 16-bit PNG comes out almost white, a float TIFF in [0, 1] black), so
    those are scaled here: 16-bit integers by 255 / 65535, floats in [0, 1] by 255. A float image
    outside [0, 1] has no known white point: it raises ValueError (the data set skips it, warning)."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{image.mode} pixels in [{pixels.min():g}, {pixels.max():g}] are not 16-bit values")
        image = Image.fromarray(np.round(pixels * (255 / 65535)).astype(np.uint8))
    elif image.mode == 'F':
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"floating-point pixels in [{np.nanmin(pixels):g}, {np.nanmax(pixels):g}]: only [0, 1] "
                             "can be converted to 8 bits without guessing; convert the file to 8-bit PNG or JPEG")
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    return image.convert('RGB')


def load_rgb(path: str) -> Image.Image:
    """torchvision's PIL loader, with 16-bit and float images scaled to 8 bits (see ``to_rgb``)."""
    with open(path, 'rb') as f:
        return to_rgb(Image.open(f))


class RobustImageFolder(datasets.ImageFolder):
    """ImageFolder whose undecodable images are skipped (``None``) with a warning, not raised.

    A single bad JPEG must not end a 200-epoch job; ``collate_skipping_bad`` drops the ``None``
    samples and counts them so that every epoch's log reports how many were skipped.
    """

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)

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
        dataset = RobustImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"{split} data at {root!r}: {e}. Expected the layout {LAYOUT}.") from e
    warn_files_in_two_classes(dataset)
    return dataset


def _has_symlinks(folder: str) -> bool:
    """Whether any entry under ``folder`` is a symbolic link (a directory walk that stats no file)."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return True
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return False


def warn_files_in_two_classes(dataset: datasets.ImageFolder) -> None:
    """Warn when one file is reached through two class folders: ImageFolder follows symbolic links, so a
    link inside a class folder that points at the data root (or at another class) gives that class
    the other classes' images too, silently. Only a tree with links needs the per-file check."""
    if not _has_symlinks(dataset.root):
        return
    classes_of: dict[str, dict[int, str]] = {}
    for path, target in dataset.samples:
        classes_of.setdefault(os.path.realpath(path), {}).setdefault(target, path)
    shared = {real: seen for real, seen in classes_of.items() if len(seen) > 1}
    if not shared:
        return
    real, seen = next(iter(shared.items()))
    example = ' and '.join(f"{path} (class {dataset.classes[target]})" for target, path in list(seen.items())[:2])
    warnings.warn(f"{len(shared)} image files under {dataset.root} are reached through more than one class folder, "
                  f"e.g. {real} as {example}: a symbolic link inside a class folder points outside it, so those "
                  "images count as several classes. Remove the link or replace it with the files it should hold.",
                  stacklevel=2)


def build_transform(is_train: bool, args) -> transforms.Compose:
    """MAE's transforms: RandAugment, random erasing and a bicubic random-resized crop for training;
    bicubic resize to input_size / 0.875 (above 224 px: no margin) and a centre crop for evaluation."""
    if is_train:
        return create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            scale=(getattr(args, 'min_crop_scale', 0.08), 1.0), hflip=getattr(args, 'hflip', 0.5),
            auto_augment=args.aa if args.aa not in (None, '', 'none') else None, interpolation='bicubic',
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop_pct = 224 / 256 if args.input_size <= 224 else 1.0
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
        self.start_index = min(start_index, self.num_samples)

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
            image = load_rgb(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping undecodable image {path}: {type(e).__name__}: {e}", stacklevel=1)
            return None
        return (self.transform(image) if self.transform is not None else image), index


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
