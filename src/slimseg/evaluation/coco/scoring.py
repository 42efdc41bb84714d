"""Scores from predictions: per-instance IoU, the mIoU table by COCO area, and pycocotools'
COCOeval for class-agnostic proposal recall (AR@K) and segm AP.

Nothing here runs a model, so ground-truth masks can be fed in as predictions (oracle check).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from slimseg.evaluation.point_miou import mask_iou
from slimseg.inference.masks import encode_rle

__all__ = ["AREA_RANGES", "area_range", "average_recall", "instance_records", "miou_table", "segm_ap"]

# COCO's area ranges in pixels (of the annotation's ``area``): small < 32², large > 96².
SMALL_MAX, LARGE_MIN = 32**2, 96**2
AREA_RANGES = ("small", "medium", "large")
PROPOSAL_MAX_DETS = (10, 100, 1000)


def area_range(area: float) -> str:
    """COCO's name for an instance of ``area`` pixels: small (< 32²), medium, large (> 96²)."""
    if area < SMALL_MAX:
        return "small"
    return "large" if area > LARGE_MIN else "medium"


def instance_records(
    annotations: Sequence[dict],
    gt_masks: np.ndarray,
    pred_masks: np.ndarray,
    scores: np.ndarray,
    prompts: np.ndarray,
) -> list[dict]:
    """One JSON-ready record per prompted instance: its IoU with the ground truth and the prediction.

    Args:
        annotations: N COCO annotations (``id``, ``area``).
        gt_masks, pred_masks: (N, H, W) bool.
        scores: (N,) predicted IoU of each chosen mask.
        prompts: (N, 4) boxes xyxy or (N, 2) points xy, in pixels.

    Returns:
        N dicts: ann_id, area, iou (0..1), score, prompt, segmentation (COCO RLE of the prediction).
    """
    if len(gt_masks) == 0:
        return []
    ious = mask_iou(torch.from_numpy(np.asarray(pred_masks, bool)), torch.from_numpy(np.asarray(gt_masks, bool)))
    return [{"ann_id": a["id"], "area": float(a["area"]), "iou": float(iou), "score": float(score),
             "prompt": [round(float(v), 2) for v in prompt], "segmentation": encode_rle(mask)}
            for a, iou, score, prompt, mask in zip(annotations, ious.tolist(), scores, prompts, pred_masks)]


def miou_table(instances: Iterable[dict]) -> dict:
    """Mean IoU in percent over all instances and per COCO area range.

    Returns:
        ``{"miou": {"all", "small", "medium", "large"}, "instances": {same keys}}``; a
        range without instances has mIoU ``None``.
    """
    sums = dict.fromkeys(("all", *AREA_RANGES), 0.0)
    counts = dict.fromkeys(("all", *AREA_RANGES), 0)
    for instance in instances:
        for key in ("all", area_range(instance["area"])):
            sums[key] += instance["iou"]
            counts[key] += 1
    return {"miou": {k: (100.0 * sums[k] / counts[k] if counts[k] else None) for k in sums}, "instances": counts}


def _evaluate(ground_truth: dict, results: list[dict], use_cats: bool, max_dets: Sequence[int] | None) -> np.ndarray:
    """COCOeval segm stats (12 numbers, see ``COCOeval.summarize``) with its printing kept off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        # loadRes adds keys (area, bbox, id) to the dicts it is given: hand it copies.
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="segm")
        evaluator.params.imgIds = [image["id"] for image in ground_truth["images"]]
        evaluator.params.useCats = int(use_cats)
        if max_dets is not None:
            evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=float)


def _without_results(ground_truth: dict, keys: Sequence[str]) -> dict:
    """What COCOeval reports for no results at all (it cannot load an empty list): 0 for a
    metric whose area range holds ground truth, -1 for one whose range holds none (the
    non-crowd annotations with COCOeval's inclusive area bounds decide)."""
    bounds = {"small": (0, SMALL_MAX), "medium": (SMALL_MAX, LARGE_MIN), "large": (LARGE_MIN, float("inf"))}
    areas = [float(a["area"]) for a in ground_truth["annotations"] if not a.get("iscrowd", 0)]

    def value(key: str) -> float:
        low, high = next((bounds[name] for name in AREA_RANGES if f"_{name}" in key), (0, float("inf")))
        return 0.0 if any(low <= area <= high for area in areas) else -1.0

    return {key: value(key) for key in keys}


def average_recall(ground_truth: dict, results: list[dict]) -> dict:
    """Class-agnostic average recall of mask proposals (COCOeval segm, ``useCats=0``).

    Args:
        ground_truth: COCO dict (images, annotations with iscrowd, categories); crowd regions
            are ignore regions, as COCOeval always treats them.
        results: COCO results (image_id, category_id, segmentation RLE, score); at most the
            K best-scored per image count for AR@K.

    Returns:
        ``{"AR@10", "AR@100", "AR@1000", "AR_small@1000", "AR_medium@1000", "AR_large@1000"}``, 0..1
        (-1 where COCOeval has no ground truth in a range).
    """
    keys = [f"AR@{k}" for k in PROPOSAL_MAX_DETS] + [f"AR_{r}@{PROPOSAL_MAX_DETS[-1]}" for r in AREA_RANGES]
    if not results:
        return _without_results(ground_truth, keys)
    stats = _evaluate(ground_truth, results, use_cats=False, max_dets=PROPOSAL_MAX_DETS)
    return dict(zip(keys, stats[6:12].tolist()))


def segm_ap(ground_truth: dict, results: list[dict]) -> dict:
    """COCO mask AP with the results' own categories and scores (COCOeval segm, standard settings).

    Returns:
        ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}``, 0..1 (-1 where COCOeval
        has no ground truth in a range).
    """
    keys = ["AP", "AP50", "AP75", *(f"AP_{r}" for r in AREA_RANGES)]
    if not results:
        return _without_results(ground_truth, keys)
    stats = _evaluate(ground_truth, results, use_cats=True, max_dets=None)
    return dict(zip(keys, stats[:6].tolist()))
