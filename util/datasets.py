"""Data: ImageFolder data sets, the MAE transforms, bad-image handling and the loader.

Layout: ``data_path/train/<class>/*`` and ``data_path/val/<class>/*`` (ImageNet's, and what
``tools/prepare_cifar.py`` / ``tools/prepare_tinyimagenet.py`` write).
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, interp_mode_to_str, str_to_pil_interp
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.errors import UserError
from util.samplers import EpochSeededDataset, EpochSeeds

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


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class RobustImageFolder(datasets.ImageFolder):
    """ImageFolder whose undecodable images are skipped (``None``) with a warning, not raised.

    A single bad JPEG must not end a 200-epoch job; ``collate_skipping_bad`` drops the ``None``
    samples and counts them so that every epoch's log reports how many were skipped.
    """

    def __init__(self, root: str, transform=None, loader=load_rgb) -> None:
        super().__init__(root, transform=transform, loader=loader)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except DECODE_ERRORS as e:
            return _skip(path, e)
        if self.transform is not None:
            try:
                image = self.transform(image)
            except OSError as e:  # a JPEG opened lazily (open_image) is decoded here: a corrupt one raises OSError
                return _skip(path, e)
        return image, target


def _skip(path: str, error: Exception) -> None:
    warnings.warn(f"skipping undecodable image {path}: {type(error).__name__}: {error}", stacklevel=2)


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; returns (images, targets, number of skipped images)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = torch.utils.data.default_collate(good)
    return images, targets, skipped


CACHE_IMAGES_HELP = ('keep every decoded image in memory after its first read, so later epochs do not read and decode '
                     'it again (small data sets: memory grows by the decoded images, per loader process); same pixels '
                     'and random draws. JPEGs opened for reduced-scale decoding (--jpeg_draft) are not kept')


class DecodedImageCache:
    """A loader that keeps each image it decoded, by path, and hands out copies: later epochs skip reading and
    decoding the file, and see the same pixels (so the same augmentation and random draws). An image the
    wrapped loader leaves undecoded (a JPEG that ``open_image`` opens for reduced-scale decoding, whose
    ``format`` is still set) is not kept; neither is a failure (it is retried, and warned about, each time)."""

    def __init__(self, loader) -> None:
        self.loader, self.images = loader, {}

    def __call__(self, path: str) -> Image.Image:
        image = self.images.get(path)
        if image is None:
            image = self.loader(path)
            if image.format is not None:  # opened but not decoded: decoded (at reduced scale) by the transform
                return image
            self.images[path] = image
        return image.copy()


def cache_decoded(dataset: Dataset) -> Dataset:
    """``dataset`` (an ImageFolder or ``util.selection.ImageFiles``, or a Subset of one) with its loader wrapped
    in a ``DecodedImageCache`` (--cache_images)."""
    inner = getattr(dataset, 'dataset', dataset)
    if not isinstance(getattr(inner, 'loader', None), DecodedImageCache):
        inner.loader = DecodedImageCache(inner.loader)
    return dataset


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):  # as ImageFolder, which follows linked folders
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def image_folder(root: str, transform, split: str, loader=None) -> RobustImageFolder:
    """An ImageFolder at ``root`` with a clear error when it is missing or empty."""
    if not os.path.isdir(root):
        raise DataError(f"{split} data not found: {root!r} is not a directory. Expected the layout {LAYOUT}.")
    if not _has_images(root):
        raise DataError(f"{split} data at {root!r} holds no images ({', '.join(IMG_EXTENSIONS)}). "
                        f"Expected the layout {LAYOUT}.")
    try:
        dataset = RobustImageFolder(root, transform=transform, **({'loader': loader} if loader else {}))
    except FileNotFoundError as e:
        raise DataError(f"{split} data at {root!r}: {e}. Expected the layout {LAYOUT}.") from e
    check_links_resolve(dataset, split)
    warn_files_in_two_classes(dataset)
    return dataset


def check_links_resolve(dataset: datasets.ImageFolder, split: str) -> None:
    """Refuse images that are symbolic links to nothing (the folder they point into moved or was removed): every
    read of them would fail, each with a warning, until a batch holds no image. Only a tree with links needs the
    per-file check."""
    if not _has_symlinks(dataset.root):
        return
    dangling = [path for path, _ in dataset.samples if not os.path.exists(path)]
    if dangling:
        raise DataError(f"{split} data at {dataset.root!r}: {len(dangling)} images are symbolic links to files that "
                        f"do not exist, e.g. {dangling[0]} -> {os.readlink(dangling[0])}: the files they point to "
                        "moved or were removed. Make the links again (a folder of tools/prepare_inat.py: run "
                        "tools/prepare_inat.py again with --root at the data set's new place).")


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


# ---------------------------------------------------------------------------------------------
# Reduced-scale JPEG decoding: the crop is chosen from the header's size, then the decoder scales
# by 1/2, 1/4 or 1/8 (PIL's Image.draft) as far as the crop still covers the output size.
# ---------------------------------------------------------------------------------------------
def open_image(path: str) -> Image.Image:
    """The image at ``path``: a JPEG opened but not decoded (its header read), so that the first transform
    can let the decoder reduce its scale; any other format decoded and converted to 8-bit RGB by
    ``to_rgb`` (16-bit and float images scaled, not clipped)."""
    with open(path, 'rb') as f:
        image = Image.open(io.BytesIO(f.read()))
    return image if image.format == 'JPEG' else to_rgb(image)


def decode_region(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                  resample: int) -> Image.Image:
    """The region ``box`` (left, upper, right, lower, in pixels of the full image) of ``image`` in RGB,
    resized to ``size`` (width, height).

    An undecoded JPEG is decoded at the smallest scale (1, 1/2, 1/4, 1/8) at which the region is still
    at least ``size``, and the region is mapped onto the reduced image; otherwise (any other image, or no
    reduction possible) the result is ``image.crop(box).resize(size)``, exactly torchvision's."""
    width, height = image.size
    region_w, region_h = box[2] - box[0], box[3] - box[1]
    # draft picks the largest scale 1/s with s <= min(width // request_w, height // request_h), so the
    # reduced region (region / s) is at least ``size``
    request = (math.ceil(width * size[0] / region_w), math.ceil(height * size[1] / region_h))
    drafted = image.draft('RGB', request)  # None: not a JPEG, or already decoded
    image = image.convert('RGB')
    if drafted is None or image.size == (width, height):
        return image.crop(tuple(round(v) for v in box)).resize(size, resample)
    _, (_, _, full_w, full_h) = drafted  # the full image's extent in reduced pixels
    sx, sy = full_w / width, full_h / height
    return image.resize(size, resample, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))


class DraftRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation with the crop drawn from the image's header size (the
    same random draws, in the same order) and decoded at reduced scale by ``decode_region``."""

    def __init__(self, crop: RandomResizedCropAndInterpolation) -> None:
        self.crop = crop

    def __call__(self, image: Image.Image) -> Image.Image:
        crop = self.crop
        top, left, h, w = crop.get_params(image, crop.scale, crop.ratio)
        mode = random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list)) \
            else crop.interpolation
        out_h, out_w = crop.size
        return decode_region(image, (left, top, left + w, top + h), (out_w, out_h),
                             str_to_pil_interp(interp_mode_to_str(mode)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


class DraftResize:
    """torchvision's Resize(size) (shorter side to ``size``) decoded at reduced scale by ``decode_region``."""

    def __init__(self, size: int, resample: int = Image.BICUBIC) -> None:
        self.size, self.resample = size, resample

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)  # torchvision's rounding of the longer side
        size = (self.size, new_long) if width <= height else (new_long, self.size)
        return decode_region(image, (0, 0, width, height), size, self.resample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


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


def default_eval_crop_pct(input_size: int, val_root: str) -> float:
    """1.0 where the evaluation images already have the input size; MAE's rule otherwise."""
    if first_image_size(val_root) == (input_size, input_size):
        return 1.0
    return mae_eval_crop_pct(input_size)


@dataclass(frozen=True)
class DataSettings:
    """The resolved flags a run's data sets are built from (``build_dataset``, ``build_transform``, the evaluation
    set of util.eval_classes and probe mode's training set): where the splits are, the classes, the input size and
    normalisation, the evaluation crop, the training augmentation, and probe mode's selection with the labelled
    originals (--pos_num) mixed into it."""
    data_path: str
    eval_data_path: str
    nb_classes: int
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    eval_crop_pct: Optional[float]
    jpeg_draft: bool
    color_jitter: Optional[float]
    min_crop_scale: float
    hflip: float
    aa: Optional[str]
    reprob: float
    remode: str
    recount: int
    eval_classes: str
    selection: str
    pos_num: int

    @classmethod
    def from_config(cls, cfg: Any) -> DataSettings:
        """The settings of a resolved configuration (its values of these fields' flags)."""
        return cls(**{field.name: getattr(cfg, field.name) for field in fields(cls)})


def build_transform(is_train: bool, args) -> transforms.Compose:
    """MAE's transforms: RandAugment, random erasing and a bicubic random-resized crop for training; for
    evaluation ``eval_transform``. With ``args.jpeg_draft`` the first step (crop or resize) takes a JPEG opened by
    ``open_image`` and decodes it at reduced scale where the output does not need the full resolution. Both
    normalise with ``args.mean`` / ``args.std`` (``args``: the run's ``DataSettings``, or any object with those
    fields)."""
    if not is_train:
        return eval_transform(args.input_size, args.eval_crop_pct, args.mean, args.std, args.jpeg_draft)
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
        scale=(args.min_crop_scale, 1.0), hflip=args.hflip,
        auto_augment=args.aa if args.aa not in (None, '', 'none') else None, interpolation='bicubic',
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=tuple(args.mean), std=tuple(args.std))
    if args.jpeg_draft:
        transform.transforms[0] = DraftRandomResizedCrop(transform.transforms[0])
    return transform


def eval_transform(input_size: int, crop_pct: Optional[float], mean: Sequence[float], std: Sequence[float],
                   draft: bool = False) -> transforms.Compose:
    """The evaluation transform: a bicubic resize to input_size / crop_pct and a centre crop (MAE's rule when
    ``crop_pct`` is None: 0.875 up to 224 px, no margin above), normalised with ``mean`` / ``std``."""
    resize_to = int(input_size / (crop_pct or mae_eval_crop_pct(input_size)))
    return transforms.Compose([
        DraftResize(resize_to) if draft else
        transforms.Resize(resize_to, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
    ])


def build_dataset(is_train: bool, args, root: Optional[str] = None, nb_classes: Optional[int] = None
                  ) -> RobustImageFolder:
    """``data_path/train`` or ``data_path/val`` with its transform (``args``: as ``build_transform``'s); checks
    ``--nb_classes`` (or ``nb_classes``, the class folders an evaluation on a subset of the model's classes
    expects)."""
    split = 'train' if is_train else 'val'
    root = root or os.path.join(args.data_path, split)
    loader = open_image if args.jpeg_draft else None
    dataset = image_folder(root, build_transform(is_train, args), split, loader)
    if nb_classes is not None and nb_classes != len(dataset.classes):
        raise DataError(f"{root!r} has {len(dataset.classes)} class folders, but the evaluated classes are "
                        f"{nb_classes}: give the evaluation set that --eval_classes names")
    if nb_classes is None and args.nb_classes != len(dataset.classes):
        raise DataError(f"{root!r} has {len(dataset.classes)} class folders but --nb_classes is {args.nb_classes}; "
                        f"pass --nb_classes {len(dataset.classes)} (or fix the folders)")
    return dataset


def build_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool, train: bool,
                 collate: Optional[Callable] = None) -> DataLoader:
    """The DataLoader of ``batch_size`` images; its ``workers`` (--num_workers > 0) persist across epochs;
    ``pin_memory``: --pin_mem on CUDA (``pins_memory``). A training sampler is a DistributedSampler, whose (seed,
    epoch, rank) re-seeds the workers each epoch (``EpochSeededDataset``). ``collate`` batches the samples into
    (images, targets, skipped) (default: collate_skipping_bad, for labels)."""
    if train and workers > 0:
        dataset, sampler = EpochSeededDataset(dataset), EpochSeeds(sampler)
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, drop_last=train,
        collate_fn=collate or collate_skipping_bad, persistent_workers=workers > 0, generator=torch.Generator())


def pins_memory(pin_mem: bool, device: str) -> bool:
    """Whether a loader pins its batches: --pin_mem, on a CUDA ``device``."""
    return pin_mem and str(device).startswith('cuda')
