"""Lay out iNaturalist 2017, 2018 or 2019 as image folders (train/<class>/, val/<class>/) by symbolic links.

    python tools/prepare_inat.py --year 2018 --root ~/data/inat2018 --output ~/data/inat2018_folders

``--root`` is the extracted data set: ``train{year}.json`` and ``val{year}.json`` (the competition's annotations,
COCO's layout: ``images`` with ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``category_id``,
``categories`` with ``id``) beside the image folders the ``file_name`` entries name (``train_val_images/`` in
2017, ``train_val2018/``, ``train_val2019/``). Every image becomes a link
``output/<split>/<category id, zero padded>/<file name>``, so the class folders sort in category-id order and a
model's class index is the competition's category id when the ids run from 0 (they do in all three years).
``output/classes.json`` lists each folder's category (id, name, supercategory). Nothing is copied.

Resumable: links already in place are kept, missing ones are made, a link to another file is replaced, and a link
the annotations no longer list is removed; an interrupted run is finished by running the same command again, and
after the data set moves, running it with --root at the new place makes every link again. Train with
``--data_path output --nb_classes N`` (N printed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.args import HelpFormatter  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

YEARS = ('2017', '2018', '2019')
SPLITS = ('train', 'val')


def annotation_file(root: str, year: str, split: str) -> str:
    return os.path.join(root, f'{split}{year}.json')


def read_annotations(path: str) -> dict:
    """The annotation file's images, labels and categories, checked for what the layout needs."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; give --root the folder that holds the year's train and val annotation "
                        "files (extracted from the competition's .json.tar.gz)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); extract the annotation file again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds {json.dumps(data)[:40]}, not an annotation file's object (with images, "
                        "annotations and categories); extract the annotation file again")
    missing = [key for key in ('images', 'annotations', 'categories') if key not in data]
    if missing:
        raise UserError(f"{path}: has no {', '.join(missing)}; is it an iNaturalist train / val annotation file "
                        "(the test file has no labels)?")
    check_entries(data, path)
    return data


def _kind(value) -> str:
    return 'a string' if isinstance(value, str) else f'of type {type(value).__name__}'


def check_entries(data: dict, path: str) -> None:
    """Every image has an id and a file_name, every annotation an image_id and an integer category_id, every
    category an integer id (the class folders are numbered by it)."""
    fix = "fix the entry or extract the annotation file again"
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data[key], list) or not all(isinstance(entry, dict) for entry in data[key]):
            raise UserError(f"{path}: {key} is not a list of objects; {fix}")
    for k, image in enumerate(data['images']):
        for field in ('id', 'file_name'):
            if field not in image:
                raise UserError(f"{path}: image entry {k} (id {image.get('id')}) has no {field}; {fix}")
        if not isinstance(image['file_name'], str):
            raise UserError(f"{path}: image entry {k} (id {image['id']}) has the file_name {image['file_name']!r}, "
                            f"not a path; {fix}")
    for k, category in enumerate(data['categories']):
        cid = category.get('id')
        if type(cid) is not int:
            raise UserError(f"{path}: category entry {k} has the id {cid!r}, {_kind(cid)}; the class folders are "
                            f"numbered by integer category ids, as the competition's files give them: {fix}")
    for k, ann in enumerate(data['annotations']):
        for field in ('image_id', 'category_id'):
            if field not in ann:
                raise UserError(f"{path}: annotation entry {k} (id {ann.get('id')}) has no {field}; {fix}")
        if type(ann['category_id']) is not int:
            raise UserError(f"{path}: annotation entry {k} (id {ann.get('id')}) has the category_id "
                            f"{ann['category_id']!r}, {_kind(ann['category_id'])}; category ids are integers: {fix}")


def plan_links(data: dict, root: str, split: str, path: str, width: int) -> list[tuple[str, str]]:
    """(link path relative to the output folder, image path) for every annotated image of ``data``."""
    files = {image['id']: image['file_name'] for image in data['images']}
    categories = {c['id'] for c in data['categories']}
    links, seen = [], {}
    for ann in data['annotations']:
        image_id, category = ann['image_id'], ann['category_id']
        if image_id not in files:
            raise UserError(f"{path}: annotation {ann.get('id')} names image {image_id}, which the file does not list")
        if category not in categories:
            raise UserError(f"{path}: annotation {ann.get('id')} names category {category}, which the file does not "
                            "list")
        if image_id in seen:
            if seen[image_id] != category:
                raise UserError(f"{path}: image {image_id} is annotated with two categories ({seen[image_id]} and "
                                f"{category}); an image folder holds one class per image")
            continue
        seen[image_id] = category
        name = os.path.basename(files[image_id])
        links.append((os.path.join(split, f'{category:0{width}d}', name), os.path.join(root, files[image_id])))
    return links


def make_link(target: str, link: str) -> bool:
    """``link`` -> ``target`` unless it already points there; returns whether it was made (or replaced)."""
    temporary = link + '.partial'
    if os.path.lexists(temporary):  # left by an interrupted run
        os.unlink(temporary)
    if os.path.islink(link) and os.readlink(link) == target:
        return False
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)  # atomic: an interrupted run leaves either the old link or the new one
    return True


def remove_unlisted_links(output: str, planned: set[str]) -> int:
    """Remove the links under ``output/<split>/`` that the annotations no longer list (an image left them, or
    an interrupted run's temporary), and class folders that this leaves empty; files that are not links are
    kept. Returns how many links were removed."""
    removed = 0
    for split in SPLITS:
        for folder, _, files in os.walk(os.path.join(output, split), topdown=False):
            for name in files:
                path = os.path.join(folder, name)
                if os.path.islink(path) and os.path.relpath(path, output) not in planned:
                    os.unlink(path)
                    removed += 1
            if folder != os.path.join(output, split) and not os.listdir(folder):
                os.rmdir(folder)
    return removed


def prepare(root: str, year: str, output: str) -> dict:
    """Link both splits; returns counts: images per split, links made, links removed, classes."""
    data = {split: read_annotations(annotation_file(root, year, split)) for split in SPLITS}
    categories = {c['id']: c for split in SPLITS for c in data[split]['categories']}
    width = len(str(max(categories)))
    plans = {split: plan_links(data[split], os.path.abspath(root), split, annotation_file(root, year, split), width)
             for split in SPLITS}
    # every class folder in both splits (main_finetune.py needs the same classes in train/ and val/)
    used = {split: {int(os.path.basename(os.path.dirname(link))) for link, _ in plans[split]} for split in SPLITS}
    if used['train'] != used['val']:
        only = sorted(used['train'] ^ used['val'])[:5]
        raise UserError(f"--root {root}: categories {only} have images in one split only; the folder layout needs "
                        "every class in train/ and val/")
    sources: dict[str, str] = {}
    for split in SPLITS:
        for link, image in plans[split]:
            if sources.setdefault(link, image) != image:
                raise UserError(f"two images of one class share the file name {os.path.basename(link)} "
                                f"({sources[link]} and {image}); rename one")
    missing = [image for split in SPLITS for _, image in plans[split] if not os.path.isfile(image)]
    if missing:
        raise UserError(f"--root {root}: {len(missing)} annotated images are missing, e.g. {missing[0]}; extract the "
                        "image archive into --root (the file_name entries are relative to it)")
    made = sum(make_link(image, os.path.join(output, link)) for split in SPLITS for link, image in plans[split])
    removed = remove_unlisted_links(output, {link for split in SPLITS for link, _ in plans[split]})
    classes = [{'folder': f'{cid:0{width}d}', 'id': cid, 'name': categories[cid].get('name'),
                'supercategory': categories[cid].get('supercategory')} for cid in sorted(used['train'])]
    with open(os.path.join(output, 'classes.json'), 'w', encoding='utf-8') as f:
        json.dump(classes, f, indent=1)
    return {'train': len(plans['train']), 'val': len(plans['val']), 'made': made, 'removed': removed,
            'classes': len(classes)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser('python tools/prepare_inat.py', description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--year', required=True, choices=YEARS, help='the competition year of the data set')
    parser.add_argument('--root', required=True,
                        help='the extracted data set: train{year}.json, val{year}.json and the image folders')
    parser.add_argument('--output', required=True, help='where train/<class>/ and val/<class>/ are linked')
    args = parser.parse_args(argv)
    if os.path.abspath(args.output) == os.path.abspath(args.root):
        raise UserError("--output must differ from --root (the links go into a folder of their own)")
    counts = prepare(args.root, args.year, args.output)
    print(f"iNaturalist {args.year}: {counts['train']} training and {counts['val']} validation images in "
          f"{counts['classes']} classes under {args.output} ({counts['made']} links made, the rest already there; "
          f"{counts['removed']} links of images the annotations no longer list removed); "
          f"train with --data_path {args.output} --nb_classes {counts['classes']}")
    return counts


if __name__ == '__main__':
    run_cli(main)
