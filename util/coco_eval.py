"""COCO evaluation of a detector: its outputs mapped back to the original images as COCO result dicts, the
results of all ranks gathered, and COCOeval's box and mask AP.

The outputs are torchvision Mask R-CNN's in evaluation (per image: ``boxes`` XYXY in the S x S frame,
``scores``, contiguous ``labels``, ``masks`` N x 1 x S x S probabilities); the targets are
util.detection_data's evaluation targets, whose ``scale`` and ``orig_size`` undo the resize and padding.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.detection_data import CocoCategories, coco_from_dict, resized_size
from util.distributed import all_gather_object, is_main_process

IOU_TYPES = ('bbox', 'segm')
# COCOeval.stats' first three entries: AP at IoU 0.50:0.95, at 0.50 and at 0.75 (all areas, 100 detections)
STATS = ('AP', 'AP50', 'AP75')
MASK_THRESHOLD = 0.5


def _boxes_to_original(boxes: torch.Tensor, orig_size: Sequence[int], scale: float) -> torch.Tensor:
    """XYXY boxes of the frame as [x, y, w, h] of the original image, clipped to it. Each axis is divided by
    its own resize factor (the resized side over the original one, util.detection_data.resized_size), the
    exact inverse of the evaluation resize, whose rounding makes the two factors differ slightly from
    ``scale``."""
    (h, w), (new_h, new_w) = orig_size, resized_size(orig_size, scale)
    boxes = boxes.float() / boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def _masks_to_rles(masks: torch.Tensor, orig_size: Sequence[int], scale: float) -> list[dict]:
    """N x 1 x S x S mask probabilities as run-length encodings on the original image: the part of the frame the
    resized image covers, resized back to the original size (bilinear), thresholded at 0.5."""
    new_h, new_w = resized_size(orig_size, scale)
    if not len(masks):
        return []
    probabilities = F.interpolate(masks[:, :, :new_h, :new_w].float(), size=tuple(orig_size), mode='bilinear',
                                  align_corners=False)
    binary = (probabilities[:, 0] > MASK_THRESHOLD).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # pycocotools wants H x W x N, Fortran
    return [{'size': rle['size'], 'counts': rle['counts'].decode('ascii')} for rle in rles]  # str: JSON-able


def to_coco_results(outputs: Iterable[dict], targets: Iterable[dict], categories: CocoCategories) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox [x, y, w, h] and segmentation of the original image,
    score) of a batch's outputs and the targets of the same images."""
    results = []
    for output, target in zip(outputs, targets):
        orig_size, scale = target['orig_size'], target['scale']
        boxes = _boxes_to_original(output['boxes'].detach().cpu(), orig_size, scale).tolist()
        rles = _masks_to_rles(output['masks'].detach(), orig_size, scale)
        ids = categories.to_ids(output['labels'])
        for box, rle, cat_id, score in zip(boxes, rles, ids, output['scores'].tolist()):
            results.append({'image_id': int(target['image_id']), 'category_id': cat_id, 'bbox': box,
                            'score': float(score), 'segmentation': rle})
    return results


def result_order(result: dict) -> tuple:
    """A total order of results independent of which rank found them: COCOeval breaks score ties by order."""
    return result['image_id'], -result['score'], result['category_id'], tuple(result['bbox'])


def gather_results(results: list[dict]) -> list[dict]:
    """Every rank's results, de-duplicated and sorted (``result_order``). A DistributedSampler pads the last
    round by repeating images, each on another rank than its first pass (util.samplers.ShardSampler repeats
    none), so an image's results are kept from the first rank that has any: the AP under --dist_eval is then a
    single process's exactly (a single process gathers too, for the same order)."""
    kept, owner = [], {}
    for rank, rank_results in enumerate(all_gather_object(results)):
        for result in rank_results:
            if owner.setdefault(result['image_id'], rank) == rank:
                kept.append(result)
    return sorted(kept, key=result_order)


def gather_image_ids(image_ids: Iterable[int]) -> list[int]:
    """The ids of the images every rank evaluated, sorted and without the sampler's repeats (``coco_evaluate``'s
    ``img_ids``: images without any detection count too)."""
    return sorted({int(i) for ids in all_gather_object(sorted(image_ids)) for i in ids})


def _unshared(coco_gt: COCO) -> COCO:
    """A COCO whose annotation dicts are copies of ``coco_gt``'s: COCOeval writes into the ground truth ('segm'
    replaces each polygon by its RLE, and it adds 'ignore'), which would break the data set that reads the same
    annotations in its next epoch."""
    return coco_from_dict({**coco_gt.dataset, 'annotations': [dict(a) for a in coco_gt.dataset['annotations']]})


def _evaluate(coco_gt: COCO, results: list[dict], iou_type: str, img_ids: Sequence[int]) -> np.ndarray:
    # loadRes takes a result's 'bbox' before its 'segmentation' (and would then give a mask the box's area), and
    # it writes into the dicts: each type gets copies holding its own field only
    other = 'segmentation' if iou_type == 'bbox' else 'bbox'
    evaluator = COCOeval(coco_gt, coco_gt.loadRes([{k: v for k, v in r.items() if k != other} for r in results]),
                         iou_type)
    evaluator.params.imgIds = list(img_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def coco_evaluate(results: list[dict], coco_gt: COCO, img_ids: Optional[Sequence[int]] = None,
                  verbose: Optional[bool] = None) -> dict[str, float]:
    """COCO's box and mask AP, AP50 and AP75 in percent (``bbox_AP``, ..., ``segm_AP75``) of ``results`` on the
    images ``img_ids`` (all of ``coco_gt``'s when None). COCOeval's messages and tables are printed when
    ``verbose`` (by default on rank 0 only). No results score 0 (COCO's loadRes refuses an empty list), and so
    does an AP COCO cannot define (-1: no ground truth instance among the images), which JSON logs must not see
    as NaN."""
    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(img_ids)
    verbose = is_main_process() if verbose is None else verbose
    coco_gt = _unshared(coco_gt)
    metrics = {}
    for iou_type in IOU_TYPES:
        if results:
            with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
                stats = _evaluate(coco_gt, results, iou_type, img_ids)
        else:
            stats = np.zeros(len(STATS))
        metrics.update({f'{iou_type}_{name}': max(float(stat), 0.0) * 100 for name, stat in zip(STATS, stats)})
    return metrics
