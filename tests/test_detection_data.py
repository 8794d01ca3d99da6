"""COCO detection data and evaluation on a generated miniature (tools/make_coco_miniature.py): the miniature's
files, the evaluation transform and the mapping of predictions back to the original images (a target returned
as predictions scores AP 100; a shifted one does not), coco_evaluate against COCOeval by hand, the gathering of
ranks' results, the training transform (large-scale jitter) with Mask R-CNN on an empty target, undecodable
images, and the data errors."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DistributedSampler

import util.coco_eval
from tools import make_coco_miniature
from tools.make_coco_miniature import CATEGORIES, make_miniature
from util.coco_eval import coco_evaluate, gather_image_ids, gather_results, to_coco_results
from util.datasets import DataError
from util.detection_data import (
    CocoCategories,
    DetectionTargets,
    build_coco_dataset,
    coco_paths,
    collate_detection,
    resized_size,
)
from util.errors import UserError, run_cli

SIZE = 96


@pytest.fixture(scope='module')
def mini(tmp_path_factory) -> str:
    """A miniature of 12 training and 6 validation images of 3 categories (ids 1, 3, 7), read only."""
    return make_miniature(str(tmp_path_factory.mktemp('coco') / 'mini'), images=12, val_images=6, size=SIZE, seed=0)


def split(root: str, name: str, img_size: int, train: bool, **kwargs):
    images_dir, ann_file = coco_paths(root, name)
    return build_coco_dataset(images_dir, ann_file, img_size, train, **kwargs)


def val_set(root: str, img_size: int = 128):
    return split(root, 'val2017', img_size, train=False)


def edited_copy(mini: str, tmp_path, edit) -> str:
    """A copy of the miniature whose training annotation dict ``edit`` changed in place."""
    root = str(tmp_path / 'edited')
    shutil.copytree(mini, root)
    path = os.path.join(root, 'annotations', 'instances_train2017.json')
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, 'w') as f:
        json.dump(data, f)
    return root


def as_predictions(target: dict, shift: float = 0.0) -> dict:
    """A target as Mask R-CNN's evaluation output (score 1), its boxes and masks moved right by ``shift`` px."""
    masks = torch.roll(target['masks'], int(shift), dims=-1)[:, None].float()
    return {'boxes': target['boxes'] + torch.tensor([shift, 0, shift, 0]), 'labels': target['labels'],
            'scores': torch.ones(len(target['labels'])), 'masks': masks}


def results_of(dataset, shift: float = 0.0) -> tuple[list[dict], list[int]]:
    results, ids = [], []
    for image_index in range(len(dataset)):
        _, target = dataset[image_index]
        results += to_coco_results([as_predictions(target, shift)], [target], dataset.categories)
        ids.append(target['image_id'])
    return results, ids


# ---- the miniature --------------------------------------------------------------------------------------------------
def test_miniature_is_coco_with_gapped_ids_and_masks_that_are_the_shapes(mini):
    coco = COCO(os.path.join(mini, 'annotations', 'instances_train2017.json'))
    assert len(coco.getImgIds()) == 12 and len(COCO(coco_paths(mini, 'val2017')[1]).getImgIds()) == 6
    assert sorted(coco.getCatIds()) == [1, 3, 7]
    assert [c['name'] for c in coco.loadCats([1, 3, 7])] == ['rectangle', 'ellipse', 'triangle']
    colour = {c[0]: np.array(c[3]) for c in CATEGORIES}
    sizes, counts = set(), set()
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(os.path.join(mini, 'train2017', image['file_name'])), dtype=float)
        assert pixels.shape[:2] == (image['height'], image['width'])
        assert all(0.75 * SIZE <= side <= 1.25 * SIZE for side in pixels.shape[:2])
        sizes.add(pixels.shape[:2])
        annotations = coco.loadAnns(coco.getAnnIds(image['id']))
        assert 1 <= len(annotations) <= 4  # the tool's 1-4 objects an image
        counts.add(len(annotations))
        for ann in annotations:
            mask = coco.annToMask(ann).astype(bool)
            xy = np.array(ann['segmentation'][0]).reshape(-1, 2)
            polygon_area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
            assert abs(mask.sum() / polygon_area - 1) < 0.08 and ann['area'] == mask.sum()
            x, y, w, h = ann['bbox']
            assert np.allclose([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()], [x, y, x + w, y + h])
            assert np.abs(pixels[mask].mean(0) - colour[ann['category_id']]).max() < 25  # painted where annotated
            assert ann['iscrowd'] == 0
    assert len(sizes) > 3 and len(counts) > 1  # images of several sizes and object counts


def test_miniature_is_deterministic_and_refuses_a_used_folder(mini, tmp_path, capsys):
    again = make_miniature(str(tmp_path / 'again'), images=12, val_images=6, size=SIZE, seed=0)
    for name in ('annotations/instances_train2017.json', 'val2017/000000005003.jpg'):
        with open(os.path.join(mini, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
            assert a.read() == b.read()
    other = make_miniature(str(tmp_path / 'other'), images=12, val_images=6, size=SIZE, seed=1)
    assert json.load(open(os.path.join(other, 'annotations/instances_train2017.json'))) != \
        json.load(open(os.path.join(mini, 'annotations/instances_train2017.json')))
    with pytest.raises(SystemExit) as stop:
        run_cli(make_coco_miniature.main, [again])
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"error: OUT {again!r} exists and is not an empty folder; give a new folder " \
                                      "to write the miniature in\n"
    with pytest.raises(UserError, match='--categories 9'):
        make_miniature(str(tmp_path / 'many'), categories=9)
    with pytest.raises(SystemExit):
        make_coco_miniature.main(['--help'])
    assert capsys.readouterr().out.startswith('usage: python tools/make_coco_miniature.py')


def test_categories_map_gapped_ids_to_contiguous_labels():
    categories = CocoCategories([7, 1, 3], ['triangle', 'rectangle', 'ellipse'])
    assert categories.ids == [1, 3, 7] and categories.names == ['rectangle', 'ellipse', 'triangle']
    assert categories.to_labels(torch.tensor([7, 1])).tolist() == [3, 1]
    assert categories.to_ids(torch.tensor([3, 2])) == [7, 3]


# ---- evaluation: the transform, the mapping back and the AP ----------------------------------------------------------
@pytest.mark.parametrize('img_size', [64, 128])
def test_eval_transform_resizes_the_longer_side_and_pads_right_and_bottom(mini, img_size):
    dataset = val_set(mini, img_size)
    for index in range(len(dataset)):
        image, target = dataset[index]
        coco_id = target['image_id']
        info = dataset.coco.imgs[coco_id]
        h, w = target['orig_size']
        assert (h, w) == (info['height'], info['width']) and image.shape == (3, img_size, img_size)
        assert target['scale'] == img_size / max(h, w)
        new_h, new_w = resized_size((h, w), target['scale'])
        assert max(new_h, new_w) == img_size
        assert image[:, new_h:].abs().sum() == 0 and image[:, :, new_w:].abs().sum() == 0
        assert (image[:, :new_h, :new_w].amax(0) > 0).all()  # the grey background: no padding inside the image
        assert target['masks'][:, new_h:].sum() == 0 and target['masks'][:, :, new_w:].sum() == 0
        gt = torch.tensor([a['bbox'] for a in dataset.coco.imgToAnns[coco_id]])
        gt[:, 2:] += gt[:, :2]
        # the boxes scale by 'scale': exactly along the longer side, by the rounded side's factor along the other
        assert torch.allclose(target['boxes'], gt * torch.tensor([new_w / w, new_h / h] * 2), atol=1e-4)
        assert torch.allclose(target['boxes'], gt * target['scale'], atol=0.5)
        assert target['labels'].tolist() == dataset.categories.to_labels(
            torch.tensor([a['category_id'] for a in dataset.coco.imgToAnns[coco_id]])).tolist()


@pytest.mark.parametrize('img_size', [64, 128])
def test_targets_returned_as_predictions_score_full_ap_and_shifted_ones_do_not(mini, img_size):
    dataset = val_set(mini, img_size)
    results, ids = results_of(dataset)
    assert {r['category_id'] for r in results} <= {1, 3, 7}
    json.dumps(results)  # the results are JSON (the RLE counts are str)
    metrics = coco_evaluate(results, dataset.coco, ids, verbose=False)
    assert metrics['bbox_AP'] == metrics['bbox_AP50'] == metrics['bbox_AP75'] == 100.0
    # masks go through a nearest resize into the frame and a bilinear one back: exact up to a frame pixel's rounding
    assert metrics['segm_AP50'] == 100.0 and metrics['segm_AP'] >= (99.0 if img_size == 128 else 85.0)
    shifted = coco_evaluate(results_of(dataset, shift=3)[0], dataset.coco, ids, verbose=False)
    assert shifted['bbox_AP'] < 80 and shifted['segm_AP'] < 80


def noisy_results(dataset, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Predictions of varied quality: the targets' boxes jittered, random scores, and a false detection a image."""
    generator = torch.Generator().manual_seed(seed)
    results, ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        predictions = as_predictions(target)
        n = len(predictions['boxes'])
        predictions['boxes'] = predictions['boxes'] + torch.randn(n, 4, generator=generator) * 3
        predictions['scores'] = torch.rand(n, generator=generator)
        false = {'boxes': torch.tensor([[5.0, 5.0, 40.0, 30.0]]), 'labels': torch.tensor([1]),
                 'scores': torch.tensor([0.5]), 'masks': torch.zeros(1, 1, *target['masks'].shape[-2:])}
        false['masks'][:, :, 5:30, 5:40] = 0.9
        batch = {k: torch.cat([predictions[k], false[k]]) for k in predictions}
        results += to_coco_results([batch], [target], dataset.categories)
        ids.append(target['image_id'])
    return results, ids


def cocoeval_by_hand(ann_file: str, results: list[dict], iou_type: str, ids: list[int]) -> list[float]:
    """AP, AP50, AP75 (%) of COCOeval run as its documentation shows, on results of that type only."""
    coco = COCO(ann_file)
    drop = 'segmentation' if iou_type == 'bbox' else 'bbox'
    evaluator = COCOeval(coco, coco.loadRes([{k: v for k, v in copy.deepcopy(r).items() if k != drop}
                                             for r in results]), iou_type)
    evaluator.params.imgIds = ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(s) * 100 for s in evaluator.stats[:3]]


def test_coco_evaluate_equals_cocoeval_by_hand(mini, capsys):
    dataset = val_set(mini)
    results, ids = noisy_results(dataset)
    kept, ann_file = copy.deepcopy(results), coco_paths(mini, 'val2017')[1]
    metrics = coco_evaluate(results, dataset.coco, ids[:4], verbose=False)
    assert results == kept  # COCO's loadRes writes into the dicts it is given: it got copies
    with open(ann_file) as f:  # and COCOeval into the ground truth, which the data set reads again
        assert dataset.coco.dataset == json.load(f)
    assert capsys.readouterr().out == ''
    in_ids = [r for r in results if r['image_id'] in ids[:4]]
    for iou_type in ('bbox', 'segm'):
        assert [metrics[f'{iou_type}_{name}'] for name in ('AP', 'AP50', 'AP75')] == \
            cocoeval_by_hand(ann_file, in_ids, iou_type, ids[:4])
    assert 20 < metrics['bbox_AP'] < 95  # neither perfect nor nothing: the comparison has something to compare
    capsys.readouterr()
    coco_evaluate(results, dataset.coco, ids, verbose=True)
    assert capsys.readouterr().out.count('Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all') == 2
    assert set(coco_evaluate([], dataset.coco, ids).values()) == {0.0}


def test_gathered_ranks_results_equal_a_single_process(mini, monkeypatch):
    dataset = val_set(mini)
    results, ids = noisy_results(dataset)
    single_metrics = coco_evaluate(gather_results(results), dataset.coco, gather_image_ids(ids), verbose=False)
    # 4 ranks of a DistributedSampler over the 6 images: it pads to 8, ranks 2 and 3 repeating the first two images
    rank_ids = [[ids[i] for i in DistributedSampler(ids, num_replicas=4, rank=r, shuffle=False)] for r in range(4)]
    assert sorted(sum(rank_ids, [])) == sorted(ids + ids[:2])
    by_rank = [[r for i in rank for r in results if r['image_id'] == i] for rank in rank_ids]
    monkeypatch.setattr(util.coco_eval, 'all_gather_object', lambda obj: by_rank if obj is results else rank_ids)
    gathered = gather_results(results)
    assert gathered == sorted(results, key=util.coco_eval.result_order) and len(gathered) == len(results)
    assert gather_image_ids(ids) == sorted(ids)
    assert coco_evaluate(gathered, dataset.coco, gather_image_ids(ids), verbose=False) == single_metrics


# ---- training: large-scale jitter -----------------------------------------------------------------------------------
def check_training_sample(image: torch.Tensor, target: dict, img_size: int) -> None:
    assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    boxes, masks = target['boxes'], target['masks']
    assert boxes.dtype == torch.float32 and masks.dtype == torch.uint8 and target['labels'].dtype == torch.int64
    assert len(boxes) == len(masks) == len(target['labels']) and masks.shape[1:] == (img_size, img_size)
    assert ((boxes >= 0) & (boxes <= img_size)).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
    assert set(target['labels'].tolist()) <= {1, 2, 3}
    for box, mask in zip(boxes, masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):  # a mask's pixels lie in its box (a pixel of rounding)
            assert box[0] - 1 <= xs.min() and xs.max() + 1 <= box[2] + 1
            assert box[1] - 1 <= ys.min() and ys.max() + 1 <= box[3] + 1


def test_training_samples_are_jittered_crops_with_aligned_masks_and_deterministic(mini):
    dataset = split(mini, 'train2017', 64, train=True, nb_classes=3)
    sizes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = dataset[seed % len(dataset)]
        check_training_sample(image, target, 64)
        sizes.add(int((image.amax(0) > 0).sum()))  # jittered scale: the padded area differs between samples
        torch.manual_seed(seed)
        again_image, again = dataset[seed % len(dataset)]
        assert torch.equal(image, again_image) and all(torch.equal(target[k], again[k]) for k in ('boxes', 'masks'))
        assert 'scale' not in target and target['image_id'] == dataset.source.ids[seed % len(dataset)]
    assert len(sizes) > 6


def two_apart(data: dict) -> None:
    """The first training image holds two instances only: a rectangle (id 1) left of a triangle (id 7)."""
    first = data['images'][0]['id']
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != first]
    for ann_id, category, x in ((1000, 1, 5.0), (1001, 7, 50.0)):
        data['annotations'].append(dict(id=ann_id, image_id=first, category_id=category, iscrowd=0, area=300.0,
                                        bbox=[x, 10.0, 15.0, 20.0],
                                        segmentation=[[x, 10.0, x + 15, 10.0, x + 15, 30.0, x, 30.0]]))


def test_training_flips_left_and_right(mini, tmp_path):
    """A crop keeps the order of two instances whose x spans are apart (clamped boxes stay in their spans); a flip
    swaps it."""
    dataset = split(edited_copy(mini, tmp_path, two_apart), 'train2017', 64, train=True)
    orders = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, target = dataset[0]
        if len(target['labels']) == 2:
            orders.add(tuple(target['labels'][target['boxes'][:, 0].argsort()].tolist()))
    assert orders == {(1, 3), (3, 1)}


def one_speck(data: dict) -> None:
    """The first training image keeps one instance only, of 1.5 px in its corner: most jitters drop it."""
    first = data['images'][0]['id']
    speck = next(a for a in data['annotations'] if a['image_id'] == first)
    speck.update(segmentation=[[1.0, 1.0, 2.5, 1.0, 2.5, 2.5, 1.0, 2.5]], bbox=[1.0, 1.0, 1.5, 1.5], area=2.0)
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != first or a is speck]


def empty_training_sample(dataset) -> tuple[torch.Tensor, dict]:
    for seed in range(50):
        torch.manual_seed(seed)
        sample = dataset[0]
        if not len(sample[1]['boxes']):
            return sample
    pytest.fail('no jitter of 50 dropped a 1.5-pixel instance')


def tiny_mask_rcnn(img_size: int) -> torchvision.models.detection.MaskRCNN:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8
    anchors = torchvision.models.detection.anchor_utils.AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),))
    return torchvision.models.detection.MaskRCNN(backbone, num_classes=4, min_size=img_size, max_size=img_size,
                                                 rpn_anchor_generator=anchors)


def test_an_emptied_training_sample_collates_and_trains_mask_rcnn(mini, tmp_path):
    dataset = split(edited_copy(mini, tmp_path, one_speck), 'train2017', 64, train=True)
    empty_image, empty = empty_training_sample(dataset)
    check_training_sample(empty_image, empty, 64)
    assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,) and empty['masks'].shape == (0, 64, 64)
    torch.manual_seed(0)
    images, targets, skipped = collate_detection([(empty_image, empty), None, dataset[1]])
    assert images.shape == (2, 3, 64, 64) and skipped == 1 and len(targets) == 2 and targets[0] is empty
    assert [t['image_id'] for t in targets] == [t['image_id'] for t in targets.list]
    model = tiny_mask_rcnn(64).train()
    losses = model(list(images), targets.to('cpu').list)
    assert set(losses) >= {'loss_mask', 'loss_box_reg', 'loss_classifier'}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_detection_targets_move_every_tensor(mini):
    _, target = val_set(mini)[0]
    moved = DetectionTargets([target]).to('meta', non_blocking=True)
    assert all(moved[0][k].device.type == 'meta' for k in ('boxes', 'labels', 'masks'))
    assert moved[0]['image_id'] == target['image_id'] and moved[0]['scale'] == target['scale']
    assert collate_detection([None, None])[2] == 2


def test_crowd_regions_and_images_without_instances_leave_training(mini, tmp_path, capsys):
    def edit(data):
        first, second, third = (im['id'] for im in data['images'][:3])
        for ann in data['annotations']:
            if ann['image_id'] == first:
                ann['iscrowd'] = 1  # the first image has crowd regions only
        data['annotations'] = [a for a in data['annotations'] if a['image_id'] != second]  # the second none
        next(a for a in data['annotations'] if a['image_id'] == third)['iscrowd'] = 1
    root = edited_copy(mini, tmp_path, edit)
    train = split(root, 'train2017', 64, train=True)
    assert 'training on 10 images of' in capsys.readouterr().out
    assert len(train) == 10 and train.source.ids[0] == 1006
    third = train.coco.imgToAnns[1006]
    assert len(train[0][1]['boxes']) <= len([a for a in third if not a['iscrowd']]) == len(third) - 1
    whole = build_coco_dataset(*coco_paths(root, 'train2017'), 64, train=False)
    assert len(whole) == 12 and whole[1][1]['boxes'].shape == (0, 4) and whole[1][1]['masks'].shape == (0, 64, 64)


def test_an_undecodable_image_is_skipped_with_a_warning(mini, tmp_path):
    root = str(tmp_path / 'broken')
    shutil.copytree(mini, root)
    dataset = val_set(root)
    with open(os.path.join(root, 'val2017', '000000005003.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.warns(UserWarning, match='skipping undecodable image .*000000005003.jpg'):
        batch = [dataset[0], dataset[1], dataset[2]]
    assert batch[1] is None
    images, targets, skipped = collate_detection(batch)
    assert skipped == 1 and len(targets) == 2 and images.shape[0] == 2


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_data_errors_name_the_flag_or_file_and_the_fix(mini, tmp_path):
    images_dir, ann_file = coco_paths(mini, 'train2017')
    with pytest.raises(DataError, match=r"--data_path .*nowhere.* is not a folder"):
        coco_paths(str(tmp_path / 'nowhere'), 'train2017')
    missing = str(tmp_path / 'none.json')
    with pytest.raises(DataError, match=r"--train_ann: the annotation file .*none.json.* does not exist"):
        build_coco_dataset(images_dir, missing, 64, True, flag_ann='--train_ann')
    (tmp_path / 'bad.json').write_text('{"images": [')
    with pytest.raises(DataError, match=r"--val_ann: the annotation file .*bad.json.* cannot be read as JSON"):
        build_coco_dataset(images_dir, str(tmp_path / 'bad.json'), 64, False, flag_ann='--val_ann')
    (tmp_path / 'list.json').write_text('{"annotations": [], "categories": []}')
    with pytest.raises(DataError, match=r"list.json.* is not a COCO annotation file \(it lacks images\)"):
        build_coco_dataset(images_dir, str(tmp_path / 'list.json'), 64, True)
    with pytest.raises(DataError, match=r"--data_path: the images folder .*train2018.* does not exist"):
        build_coco_dataset(images_dir.replace('2017', '2018'), ann_file, 64, True)
    with pytest.raises(DataError, match=r"--nb_classes 5 disagrees with .*instances_train2017.json.*, which has 3 "
                                        r"categories; pass --nb_classes 3"):
        build_coco_dataset(images_dir, ann_file, 64, True, nb_classes=5)


def test_missing_images_and_an_unannotated_training_set_are_refused(mini, tmp_path):
    root = edited_copy(mini, tmp_path, lambda data: data['annotations'].clear())
    os.remove(os.path.join(root, 'val2017', '000000005006.jpg'))
    with pytest.raises(DataError, match=r"--data_path: 1 images listed in .*instances_val2017.json.* are missing from "
                                        r".*val2017.* \(e.g. 000000005006.jpg\); give the images folder"):
        val_set(root)
    with pytest.raises(DataError, match=r"no image in .*instances_train2017.json.* has an annotated instance"):
        split(root, 'train2017', 64, train=True)
    assert len(split(root, 'train2017', 64, train=False)) == 12  # evaluation keeps images without instances
