"""Predictions for one image under each COCO protocol; no scoring here.

Box and point prompts decode three masks each and keep the one with the highest predicted
IoU (SAM's multimask output, as the SAM/SlimSAM/Lite-SAM papers do for single prompts).
"""

from __future__ import annotations

import numpy as np
import torch

from slimseg.inference.everything import MaskGenerator
from slimseg.inference.masks import encode_rle
from slimseg.inference.predictor import Predictor
from slimseg.modeling.autoppn import interior_peak

__all__ = ["box_prompt_masks", "detection_results", "everything_results", "interior_point", "point_prompt_masks",
           "xywh_to_xyxy"]


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) COCO [x, y, w, h] → (N, 4) [x0, y0, x1, y1], float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a non-empty (H, W) mask's most interior pixel: the maximum of its distance
    transform, with the image border counting as boundary (``interior_peak`` pads by one)."""
    row, col, _ = interior_peak(mask)
    return float(col), float(row)


def _best_of_three(masks: torch.Tensor, ious: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, H, W) masks, (B, 3) predicted IoUs → (B, H, W) bool and (B,) float32 of the best."""
    best = ious.argmax(dim=1)
    rows = torch.arange(len(best), device=masks.device)
    return masks[rows, best].cpu().numpy(), ious[rows, best].float().cpu().numpy()


def _decode_in_batches(predictor: Predictor, count: int, batch: int, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Run ``prompts(start, stop) -> predict_torch keyword arguments`` over ``count`` prompts."""
    height, width = predictor.original_size
    masks, scores = [np.zeros((0, height, width), bool)], [np.zeros(0, np.float32)]
    for start in range(0, count, batch):
        out_masks, out_ious, _ = predictor.predict_torch(**prompts(start, min(start + batch, count)),
                                                         multimask_output=True)
        chosen, chosen_scores = _best_of_three(out_masks, out_ious)
        masks.append(chosen)
        scores.append(chosen_scores)
    return np.concatenate(masks), np.concatenate(scores)


def box_prompt_masks(predictor: Predictor, boxes_xyxy: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Masks for box prompts on the image set in ``predictor``.

    Args:
        boxes_xyxy: (N, 4) boxes in original-image pixels.
        batch: prompts decoded per mask-decoder call (memory only; results do not change).

    Returns:
        (N, H, W) bool masks and (N,) predicted IoUs, best of three per box.
    """
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4), device=predictor.device)
    boxes = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
    return _decode_in_batches(predictor, len(boxes), batch,
                              lambda a, b: {"point_coords": None, "point_labels": None, "boxes": boxes[a:b]})


def point_prompt_masks(predictor: Predictor, points_xy: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Masks for single positive points: (N, 2) XY pixels → (N, H, W) bool and (N,) predicted IoUs."""
    points = torch.as_tensor(np.asarray(points_xy, dtype=np.float32).reshape(-1, 1, 2), device=predictor.device)
    coords = predictor.transform.apply_coords_torch(points, predictor.original_size)
    labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
    return _decode_in_batches(predictor, len(coords), batch,
                              lambda a, b: {"point_coords": coords[a:b], "point_labels": labels[a:b]})


def everything_results(generator: MaskGenerator, image: np.ndarray, image_id: int) -> tuple[list[dict], float]:
    """Class-agnostic COCO results (category 1, score = predicted IoU) of SegEvery on one
    (H, W, 3) uint8 RGB image, and the seconds the generator took."""
    records, timings = generator.generate_timed(image)
    results = [{"image_id": image_id, "category_id": 1, "segmentation": _rle(r["segmentation"]),
                "score": float(r["predicted_iou"])} for r in records]
    return results, float(timings["total"])


def detection_results(predictor: Predictor, detections: list[dict], image_id: int, batch: int = 64) -> list[dict]:
    """COCO segm results for one image's detections (``category_id``, ``bbox`` xywh, ``score``),
    each box prompted on the image set in ``predictor``; category and score are the detector's."""
    if not detections:
        return []
    masks, _ = box_prompt_masks(predictor, xywh_to_xyxy(np.array([d["bbox"] for d in detections])), batch)
    return [{"image_id": image_id, "category_id": d["category_id"], "segmentation": encode_rle(mask),
             "score": d["score"]} for d, mask in zip(detections, masks)]


def _rle(segmentation: dict) -> dict:
    """The generator's coco_rle segmentation as a plain JSON-ready dict."""
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]),
            "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}
