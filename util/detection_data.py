"""Data for COCO detection and instance segmentation: the files' checks, the category labels, the data set with
its training (large-scale jitter) and evaluation (resize and pad) transforms, and the batch collation.

Layout (COCO's): ``--data_path`` holds ``train2017/``, ``val2017/`` and ``annotations/instances_{split}.json``;
``--train_ann`` / ``--val_ann`` name other annotation files. A sample is ``(image, target)``: the image a float
tensor 3 x S x S in [0, 1] (not normalised: the model normalises), the target a dict of ``boxes`` (float32 N x 4,
XYXY pixels of the S x S frame), ``labels`` (int64, contiguous 1..K; 0 is the background), ``masks`` (uint8
N x S x S), ``image_id`` (the COCO id) and ``orig_size`` ((h, w) of the file); an evaluation target also holds
``scale``, the resize factor from the file to the frame (``resized_size`` gives the resized image's extent).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from util.datasets import DECODE_ERRORS, DataError, _skip, load_rgb
from util.distributed import log

SPLITS = ('train2017', 'val2017')
COCO_LAYOUT = ("--data_path holding train2017/, val2017/ and annotations/instances_train2017.json, "
               "annotations/instances_val2017.json (COCO's layout)")
COCO_KEYS = ('images', 'annotations', 'categories')
# how many missing image files an error names
NAMED_MISSING = 3


def coco_paths(data_path: str, split: str, ann: Optional[str] = None) -> tuple[str, str]:
    """(images folder, annotation file) of ``split`` ('train2017' or 'val2017') under ``data_path``; ``ann``
    (--train_ann / --val_ann) replaces the annotation file."""
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path {data_path!r} is not a folder; give {COCO_LAYOUT}")
    return os.path.join(data_path, split), ann or os.path.join(data_path, 'annotations', f'instances_{split}.json')


def _read_coco_json(ann_file: str, flag_ann: str) -> dict:
    if not os.path.isfile(ann_file):
        raise DataError(f"{flag_ann}: the annotation file {ann_file!r} does not exist; give {COCO_LAYOUT}, "
                        "or name the file with --train_ann / --val_ann")
    try:
        with open(ann_file, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{flag_ann}: the annotation file {ann_file!r} cannot be read as JSON ({e}); "
                        "replace it with COCO's instances JSON") from e
    missing = [key for key in COCO_KEYS if key not in data] if isinstance(data, dict) else list(COCO_KEYS)
    if missing:
        raise DataError(f"{flag_ann}: {ann_file!r} is not a COCO annotation file (it lacks {', '.join(missing)}); "
                        "give an instances_*.json file of COCO's format")
    return data


def check_coco_files(images_dir: str, ann_file: str, flag_images: str, flag_ann: str) -> dict:
    """Check that ``ann_file`` is COCO's JSON and that ``images_dir`` holds every image it lists; returns the
    parsed JSON. Raises DataError naming ``flag_images`` / ``flag_ann``."""
    data = _read_coco_json(ann_file, flag_ann)
    if not os.path.isdir(images_dir):
        raise DataError(f"{flag_images}: the images folder {images_dir!r} does not exist; give {COCO_LAYOUT}")
    present = set(os.listdir(images_dir))  # one listing instead of a stat per image (118k for COCO's train2017)
    missing = [im['file_name'] for im in data['images']
               if im['file_name'] not in present and not os.path.isfile(os.path.join(images_dir, im['file_name']))]
    if missing:
        raise DataError(f"{flag_images}: {len(missing)} images listed in {ann_file!r} are missing from "
                        f"{images_dir!r} (e.g. {', '.join(missing[:NAMED_MISSING])}); give the images folder that "
                        "matches the annotation file")
    return data


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO of parsed JSON (the file is not read a second time); its index messages are silenced."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoCategories:
    """COCO's category ids (sorted, with gaps) mapped to the contiguous labels 1..K of the model (0 is the
    background), and back."""

    def __init__(self, ids: Sequence[int], names: Sequence[str]) -> None:
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.ids = [int(ids[i]) for i in order]
        self.names = [names[i] for i in order]
        self.label_of = {cat_id: label for label, cat_id in enumerate(self.ids, start=1)}

    @classmethod
    def from_coco(cls, coco: COCO) -> CocoCategories:
        cats = coco.loadCats(coco.getCatIds())
        return cls([c['id'] for c in cats], [c['name'] for c in cats])

    def __len__(self) -> int:
        return len(self.ids)

    def to_labels(self, category_ids: torch.Tensor) -> torch.Tensor:
        """Contiguous labels (int64) of COCO category ids."""
        return torch.tensor([self.label_of[int(c)] for c in category_ids], dtype=torch.int64)

    def to_ids(self, labels: torch.Tensor) -> list[int]:
        """COCO category ids of contiguous labels 1..K."""
        return [self.ids[int(label) - 1] for label in labels]


def resized_size(orig_size: Sequence[int], scale: float) -> tuple[int, int]:
    """(h, w) of an image of ``orig_size`` after the evaluation resize by ``scale``: the one rounding rule of the
    transform and of the mapping back (util.coco_eval), so that one inverts the other exactly."""
    return round(orig_size[0] * scale), round(orig_size[1] * scale)


def eval_scale(orig_size: Sequence[int], img_size: int) -> float:
    """The evaluation resize factor: the longer side to ``img_size``."""
    return img_size / max(orig_size)


def _resize_masks(masks: tv_tensors.Mask, size: Sequence[int]) -> tv_tensors.Mask:
    # NEAREST_EXACT samples each output pixel's centre; torchvision's NEAREST (its choice for masks) floors it,
    # which moves a mask by up to half a pixel against the bilinear-resized image
    return v2.functional.resize(masks, list(size), interpolation=v2.InterpolationMode.NEAREST_EXACT)


class Resize(v2.Resize):
    """v2.Resize whose masks stay centred on the image (``_resize_masks``)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize_masks(inpt, self.size) if isinstance(inpt, tv_tensors.Mask) else super().transform(inpt, params)


class ScaleJitter(v2.ScaleJitter):
    """v2.ScaleJitter whose masks stay centred on the image (``_resize_masks``)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return _resize_masks(inpt, params['size'])
        return super().transform(inpt, params)


def resize_and_pad(image: tv_tensors.Image, target: dict, img_size: int) -> tuple[tv_tensors.Image, dict]:
    """The evaluation transform: the longer side resized to ``img_size`` (aspect kept), then zeros padded on the
    right and bottom to img_size x img_size, so that the frame's origin stays the image's."""
    height, width = image.shape[-2:]
    new_h, new_w = resized_size((height, width), eval_scale((height, width), img_size))
    image, target = Resize((new_h, new_w), antialias=True)(image, target)
    return v2.Pad([0, 0, img_size - new_w, img_size - new_h], fill=0)(image, target)


def train_transform(img_size: int) -> v2.Compose:
    """ViTDet's large-scale jitter: a horizontal flip, a resize to 0.1-2.0 times the img_size x img_size fit, a
    random img_size x img_size crop (zero-padded where the image is smaller), and the boxes the crop left
    degenerate dropped with their labels and masks."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        ScaleJitter(target_size=(img_size, img_size), scale_range=(0.1, 2.0), antialias=True),
        v2.RandomCrop(img_size, pad_if_needed=True, fill=0),
        v2.SanitizeBoundingBoxes(),
    ])


class UndecodableImage(Exception):
    """An image file that cannot be decoded, raised through torchvision's wrapper so that only a decoding
    failure, never a bad annotation, becomes a skipped sample."""

    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(path, error)
        self.path, self.error = path, error


class _CocoImages(CocoDetection):
    """CocoDetection over an index already built (the JSON is parsed once, by check_coco_files), whose images
    are read as util.datasets does (16-bit and float images scaled), and whose targets leave crowd regions
    out: a crowd region is no instance to learn, and COCOeval reads the crowd regions from the file itself."""

    def __init__(self, root: str, coco: COCO, ids: list[int]) -> None:
        super(CocoDetection, self).__init__(root)  # CocoDetection's own __init__ would parse the file again
        self.coco, self.ids = coco, ids

    def _load_image(self, id: int) -> Image.Image:
        path = os.path.join(self.root, self.coco.imgs[id]['file_name'])
        try:
            return load_rgb(path)
        except DECODE_ERRORS as e:
            raise UndecodableImage(path, e) from e

    def _load_target(self, id: int) -> list[Any]:
        return [a for a in super()._load_target(id) if not a.get('iscrowd', 0)]


class CocoDetectionData(Dataset):
    """COCO images and their instances as ``(image, target)`` of an img_size x img_size frame (the module's
    docstring says what a target holds); an undecodable image is ``None``, with a warning, as in
    util.datasets.RobustImageFolder (``collate_detection`` skips and counts it)."""

    TARGET_KEYS = ('image_id', 'boxes', 'masks', 'labels')

    def __init__(self, images: _CocoImages, categories: CocoCategories, img_size: int, train: bool) -> None:
        self.source, self.categories, self.img_size, self.train = images, categories, img_size, train
        self.images = wrap_dataset_for_transforms_v2(images, target_keys=self.TARGET_KEYS)
        self.transform = train_transform(img_size) if train else None

    @property
    def coco(self) -> COCO:
        return self.source.coco

    @property
    def paths(self) -> list[str]:
        """The images' files in sample order, relative to the images folder (util.samplers.dataset_fingerprint)."""
        return [self.coco.imgs[i]['file_name'] for i in self.source.ids]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, dict]]:
        try:
            image, target = self.images[index]
        except UndecodableImage as e:
            return _skip(e.path, e.error)
        image = v2.functional.to_image(image)
        orig_size = tuple(image.shape[-2:])
        target = self._instances(target, orig_size)
        if self.train:
            image, target = self.transform(image, target)
            extra = {}
        else:
            image, target = resize_and_pad(image, target, self.img_size)
            extra = {'scale': eval_scale(orig_size, self.img_size)}
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        return image.as_subclass(torch.Tensor), {
            'boxes': target['boxes'].as_subclass(torch.Tensor).float(), 'labels': target['labels'],
            'masks': target['masks'].as_subclass(torch.Tensor).to(torch.uint8), 'image_id': int(target['image_id']),
            'orig_size': orig_size, **extra}

    def _instances(self, target: dict, orig_size: tuple[int, int]) -> dict:
        """The wrapper's target with contiguous labels; an image without instances (the wrapper then gives only
        its id) gets empty boxes, labels and masks, so that the transforms and the model see the same keys."""
        if 'boxes' not in target:
            return {'image_id': target['image_id'], 'labels': torch.zeros(0, dtype=torch.int64),
                    'boxes': tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=orig_size),
                    'masks': tv_tensors.Mask(torch.zeros(0, *orig_size, dtype=torch.uint8))}
        return {**target, 'labels': self.categories.to_labels(target['labels'])}


def _check_categories(coco: COCO, categories: CocoCategories, ann_file: str, nb_classes: Optional[int]) -> None:
    if not len(categories):
        raise DataError(f"{ann_file!r} lists no categories; give a COCO annotation file with its categories")
    unknown = {a['category_id'] for a in coco.dataset['annotations']} - set(categories.ids)
    if unknown:
        raise DataError(f"{ann_file!r} has annotations of category ids {sorted(unknown)[:NAMED_MISSING]} that its "
                        "'categories' do not list; fix the file")
    if nb_classes is not None and nb_classes != len(categories):
        raise DataError(f"--nb_classes {nb_classes} disagrees with {ann_file!r}, which has {len(categories)} "
                        f"categories; pass --nb_classes {len(categories)} (or give the matching annotation file)")


def _annotated(coco: COCO, ann_file: str) -> list[int]:
    """The ids of the images with at least one instance that is no crowd region: the only ones training uses."""
    ids = sorted(coco.imgs)
    annotated = [i for i in ids if any(not a.get('iscrowd', 0) for a in coco.imgToAnns[i])]
    if not annotated:
        raise DataError(f"no image in {ann_file!r} has an annotated instance (other than crowd regions), so there "
                        "is nothing to train on; give the training annotation file")
    if len(annotated) < len(ids):
        log(f"training on {len(annotated)} images of {ann_file}: {len(ids) - len(annotated)} without instances "
            "left out")
    return annotated


def build_coco_dataset(images_dir: str, ann_file: str, img_size: int, train: bool, nb_classes: Optional[int] = None,
                       flag_images: str = '--data_path', flag_ann: str = '--data_path') -> CocoDetectionData:
    """The COCO data set of ``images_dir`` and ``ann_file`` (``coco_paths``), with the training transform or the
    evaluation one. ``nb_classes`` (--nb_classes), when given, must equal the file's number of categories; the
    errors name ``flag_images`` and ``flag_ann`` (--train_ann / --val_ann when they were given)."""
    coco = coco_from_dict(check_coco_files(images_dir, ann_file, flag_images, flag_ann))
    categories = CocoCategories.from_coco(coco)
    _check_categories(coco, categories, ann_file, nb_classes)
    ids = _annotated(coco, ann_file) if train else sorted(coco.imgs)
    return CocoDetectionData(_CocoImages(images_dir, coco, ids), categories, img_size, train)


class DetectionTargets:
    """A batch's target dicts; ``to`` and ``pin_memory`` (the DataLoader's --pin_mem) act on every tensor in
    them, so that the batch moves like ``util.datasets.collate_skipping_bad``'s label tensor."""

    def __init__(self, targets: list[dict]) -> None:
        self.list = targets

    def _map(self, move) -> DetectionTargets:
        return DetectionTargets([{k: move(v) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                                 for t in self.list])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionTargets:
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DetectionTargets:
        return self._map(lambda v: v.pin_memory())

    def __len__(self) -> int:
        return len(self.list)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.list)

    def __getitem__(self, index: int) -> dict:
        return self.list[index]


def collate_detection(batch: list) -> tuple[torch.Tensor, DetectionTargets, int]:
    """The good samples' images stacked (B x 3 x S x S) and their targets; returns (images, targets, number of
    skipped images), as util.datasets.collate_skipping_bad."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), DetectionTargets([]), len(batch)
    return torch.stack([image for image, _ in good]), DetectionTargets([t for _, t in good]), len(batch) - len(good)
