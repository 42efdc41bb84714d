"""Box geometry for the mask generator: NMS, mask → box, crop-edge tests, uncropping.

Boxes are XYXY. Mask boxes follow segment-anything: x1/y1 are the last covered
column/row (inclusive), and an empty mask gets [0, 0, 0, 0].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "batched_mask_to_box",
    "batched_nms",
    "box_area",
    "box_xyxy_to_xywh",
    "is_box_near_crop_edge",
    "nms",
    "uncrop_boxes_xyxy",
    "uncrop_points",
]

# Pairwise IoU entries computed at once (rows x columns): bounds NMS memory for huge N.
_BLOCK_ENTRIES = 1 << 21


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY → (N,) areas, in the boxes' dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _overlaps(rows: torch.Tensor, columns: torch.Tensor, threshold: float) -> np.ndarray:
    """(R, 4) and (C, 4) float32 boxes → (R, C) bool, IoU > threshold.

    The IoU is evaluated in float32 in torchvision's operation order, then compared in
    float64 as its C++ kernel does (a float32 threshold could round either way).
    """
    top_left = torch.maximum(rows[:, None, :2], columns[None, :, :2])
    bottom_right = torch.minimum(rows[:, None, 2:], columns[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    union = box_area(rows)[:, None] + box_area(columns)[None, :] - inter
    return ((inter / union).double() > threshold).numpy()


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision's semantics.

    Boxes are visited by score, descending, ties in input order (stable sort); a box is
    dropped when its IoU with an already kept box is strictly above ``iou_threshold``.

    Arguments:
        boxes: (N, 4) XYXY. scores: (N,).
    Returns:
        (N',) int64 indices of the kept boxes, by descending score, on the boxes' device.
    """
    device = boxes.device
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.long, device=device)
    # The greedy walk is sequential: cheaper on the CPU than as many tiny device launches.
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
    ordered = boxes.detach().cpu().float()[order]
    count = ordered.shape[0]
    removed = np.zeros(count, dtype=bool)
    kept: list[int] = []
    block = max(1, min(512, _BLOCK_ENTRIES // count))
    for start in range(0, count, block):
        stop = min(start + block, count)
        # Only boxes at or after `start` can still be suppressed by rows of this block.
        over = _overlaps(ordered[start:stop], ordered[start:], iou_threshold)
        for row in range(stop - start):
            if removed[start + row]:
                continue
            kept.append(start + row)
            removed[start:] |= over[row]
    return order[torch.as_tensor(kept, dtype=torch.long)].to(device)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, categories: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each category (torchvision's ``batched_nms``): boxes of different
    categories are shifted apart by ``category * (max coordinate + 1)`` so never overlap.

    Arguments:
        boxes: (N, 4) XYXY. scores: (N,). categories: (N,) integer labels.
    Returns:
        (N',) int64 indices of the kept boxes, by descending score.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    shift = categories.to(boxes) * (boxes.max() + 1)
    return nms(boxes + shift[:, None], scores, iou_threshold)


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool masks → (..., 4) int64 XYXY boxes, inclusive x1/y1; [0, 0, 0, 0] if empty."""
    height, width = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros((*masks.shape[:-2], 4), dtype=torch.long, device=masks.device)
    rows = masks.any(dim=-1)
    columns = masks.any(dim=-2)

    def extent(present: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(length, device=present.device)
        first = torch.where(present, index, length).amin(dim=-1)
        last = torch.where(present, index, -1).amax(dim=-1)
        return first, last

    top, bottom = extent(rows, height)
    left, right = extent(columns, width)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(dim=-1)
    return boxes.masked_fill(empty[..., None], 0)


def box_xyxy_to_xywh(box: Sequence[int] | np.ndarray | torch.Tensor) -> list:
    """One XYXY box → [x, y, w, h] as a list of Python numbers (w = x1 - x0)."""
    x0, y0, x1, y1 = (value.item() if hasattr(value, "item") else value for value in box)
    return [x0, y0, x1 - x0, y1 - y0]


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """(..., 4) XYXY boxes in a crop → the full image (``crop_box`` is XYXY)."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """(..., 2) XY points in a crop → the full image."""
    return points + torch.tensor([int(crop_box[0]), int(crop_box[1])], device=points.device)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """(N,) bool: the box (XYXY, crop frame) comes within ``atol`` pixels of a crop side that
    is not also a side of the image, i.e. the mask was probably cut off by the crop."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)
