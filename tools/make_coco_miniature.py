"""Write a miniature COCO detection / instance segmentation data set of coloured shapes, for trying detection.

    python tools/make_coco_miniature.py data/coco_mini --images 24 --val_images 8 --size 96 --seed 0

writes COCO's layout: ``OUT/train2017/*.jpg``, ``OUT/val2017/*.jpg`` and
``OUT/annotations/instances_{train,val}2017.json``. Each image holds 1-4 filled shapes on a noisy grey
background, apart from each other; a category is one shape in one colour, and the category ids have gaps as
COCO's do (1, 3, 7, ...). A shape is painted on the pixels that pycocotools decodes from its polygon, so its
annotation is exactly its pixels. Image sides vary between 0.75 and 1.25 times --size, so that resizing and
padding are exercised. The same arguments write the same files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from util.args import HelpFormatter  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402


def regular_polygon(corners: int) -> list[tuple[float, float]]:
    """A regular polygon inscribed in the unit square, its first corner at the top."""
    angles = [2 * math.pi * k / corners - math.pi / 2 for k in range(corners)]
    return [(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in angles]


# (COCO id, name, outline in the unit square, colour). The ids have gaps, so that the mapping of ids to
# contiguous labels is exercised; an ellipse is the 32-corner polygon its annotation holds.
CATEGORIES = (
    (1, 'rectangle', [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)], (220, 40, 40)),
    (3, 'ellipse', regular_polygon(32), (40, 200, 60)),
    (7, 'triangle', [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)], (50, 80, 230)),
    (8, 'diamond', regular_polygon(4), (235, 215, 30)),
    (12, 'pentagon', regular_polygon(5), (210, 50, 210)),
    (20, 'hexagon', regular_polygon(6), (30, 210, 220)),
)
SPLITS = ('train2017', 'val2017')
# each split's first image id; ids step by 3, as COCO's ids need not be contiguous
FIRST_IMAGE_ID = {'train2017': 1000, 'val2017': 5000}
MAX_OBJECTS = 4
GAP = 3  # pixels kept free between two shapes' boxes, so that no shape covers another


def draw_boxes(rng: np.random.Generator, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """1-4 boxes (x, y, w, h) inside the image, apart from each other by GAP pixels; a box that finds no free
    place in 50 draws is left out (an image keeps at least its first)."""
    wanted, boxes = int(rng.integers(1, MAX_OBJECTS + 1)), []
    short = min(width, height)
    for _ in range(50 * wanted):
        if len(boxes) == wanted:
            break
        w, h = rng.uniform(0.2, 0.45, size=2) * short
        x, y = rng.uniform(1, width - w - 1), rng.uniform(1, height - h - 1)
        if all(x + w + GAP < bx or bx + bw + GAP < x or y + h + GAP < by or by + bh + GAP < y
               for bx, by, bw, bh in boxes):
            boxes.append((x, y, w, h))
    return boxes


def annotate(outline: list[tuple[float, float]], box: tuple[float, float, float, float], width: int,
             height: int) -> tuple[list[float], np.ndarray]:
    """The shape's polygon in COCO's flat [x1, y1, x2, y2, ...] form (2 decimals) and the mask pycocotools
    decodes from it (height x width, uint8)."""
    x, y, w, h = box
    polygon = [round(v, 2) for px, py in outline for v in (x + px * w, y + py * h)]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))
    return polygon, mask


def draw_image(rng: np.random.Generator, width: int, height: int, categories: int
               ) -> tuple[np.ndarray, list[dict]]:
    """An image (height x width x 3, uint8) and its objects' annotations (without ids)."""
    pixels = rng.integers(90, 160) + rng.normal(0, 12, size=(height, width, 3))
    objects = []
    for box in draw_boxes(rng, width, height):
        category_id, _, outline, colour = CATEGORIES[int(rng.integers(categories))]
        polygon, mask = annotate(outline, box, width, height)
        pixels[mask.astype(bool)] = colour
        xs, ys = polygon[0::2], polygon[1::2]
        objects.append(dict(category_id=category_id, segmentation=[polygon], area=float(mask.sum()),
                            bbox=[min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                            iscrowd=0))
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def write_split(out: str, split: str, count: int, size: int, categories: int, rng: np.random.Generator) -> dict:
    """Write ``count`` images of ``split``; returns its COCO annotation dict."""
    os.makedirs(os.path.join(out, split))
    images, annotations = [], []
    for i in range(count):
        image_id = FIRST_IMAGE_ID[split] + 3 * i
        width, height = (int(v) for v in rng.integers(round(0.75 * size), round(1.25 * size) + 1, size=2))
        pixels, objects = draw_image(rng, width, height, categories)
        file_name = f'{image_id:012d}.jpg'
        Image.fromarray(pixels).save(os.path.join(out, split, file_name), quality=95)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        annotations += [dict(id=len(annotations) + k + 1, image_id=image_id, **o) for k, o in enumerate(objects)]
    return dict(info=dict(description=f'COCO miniature of coloured shapes ({split})'), licenses=[],
                images=images, annotations=annotations,
                categories=[dict(id=c[0], name=c[1], supercategory='shape') for c in CATEGORIES[:categories]])


def make_miniature(out: str, images: int = 24, val_images: int = 8, size: int = 96, seed: int = 0,
                   categories: int = 3) -> str:
    """Write the miniature under ``out`` (which must not exist or be empty); returns ``out``."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"OUT {out!r} exists and is not an empty folder; give a new folder to write the miniature in")
    if not 1 <= categories <= len(CATEGORIES):
        raise UserError(f"--categories {categories}: the miniature has 1 to {len(CATEGORIES)} categories; "
                        "pass one of those")
    if size < 32 or images < 1 or val_images < 1:
        raise UserError(f"--size {size}, --images {images}, --val_images {val_images}: the miniature needs --size "
                        "of at least 32 and at least one image per split; pass larger values")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, 'annotations'))
    for split, count in zip(SPLITS, (images, val_images)):
        coco = write_split(out, split, count, size, categories, rng)
        with open(os.path.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser('python tools/make_coco_miniature.py', description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument('out', metavar='OUT', help='a new (or empty) folder to write the data set in (no default)')
    parser.add_argument('--images', type=int, default=24, help='training images (train2017/)')
    parser.add_argument('--val_images', type=int, default=8, help='validation images (val2017/)')
    parser.add_argument('--size', type=int, default=96, help='typical image side; sides vary by +-25%%')
    parser.add_argument('--seed', type=int, default=0, help='random seed; the same seed writes the same files')
    parser.add_argument('--categories', type=int, default=3, help=f'categories, 1 to {len(CATEGORIES)}')
    args = parser.parse_args(argv)
    make_miniature(args.out, args.images, args.val_images, args.size, args.seed, args.categories)
    print(f"wrote {args.images} training and {args.val_images} validation images of {args.categories} categories "
          f"under {args.out}")


if __name__ == '__main__':
    run_cli(main)
