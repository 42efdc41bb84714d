"""Run-length encodings of masks, as segment-anything's mask generator writes them.

An *uncompressed* RLE is ``{"size": [H, W], "counts": [int, ...]}``: run lengths over the
pixels in column-major (Fortran) order, alternating outside/inside and always starting with
an outside run (0 when the first pixel is inside). pycocotools turns it into COCO's
compressed form.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from slimseg.errors import SlimsegError

__all__ = ["area_from_rle", "coco_encode_rle", "mask_to_rle", "remove_small_regions", "rle_to_mask"]


def mask_to_rle(masks: torch.Tensor) -> list[dict]:
    """(B, H, W) bool masks (any device) → B uncompressed RLEs."""
    count, height, width = masks.shape
    flat = masks.transpose(1, 2).reshape(count, height * width)
    if flat.shape[1] == 0:
        return [{"size": [height, width], "counts": [0]} for _ in range(count)]
    # Only the (sparse) positions where a run ends leave the device.
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero()
    owners = changes[:, 0].cpu().numpy()
    ends = changes[:, 1].cpu().numpy() + 1
    first_inside = flat[:, 0].cpu().numpy()
    splits = np.searchsorted(owners, np.arange(count + 1))
    rles = []
    for index in range(count):
        boundaries = np.concatenate([[0], ends[splits[index] : splits[index + 1]], [height * width]])
        runs = np.diff(boundaries).tolist()
        counts = [0, *runs] if first_inside[index] else runs
        rles.append({"size": [height, width], "counts": counts})
    return rles


def rle_to_mask(rle: dict) -> np.ndarray:
    """Uncompressed RLE → (H, W) bool array (C order)."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    inside = np.arange(counts.size) % 2 == 1
    flat = np.repeat(inside, counts)
    if flat.size != height * width:
        raise SlimsegError(f"RLE counts cover {flat.size} pixels, but its size {height}x{width} needs {height * width}")
    return np.ascontiguousarray(flat.reshape(width, height).T)


def area_from_rle(rle: dict) -> int:
    """Number of inside pixels of an uncompressed RLE (the odd-numbered runs)."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict) -> dict:
    """Uncompressed RLE → COCO compressed RLE with ``counts`` as a str (JSON-ready)."""
    height, width = rle["size"]
    coco = mask_utils.frPyObjects(rle, height, width)
    coco["counts"] = coco["counts"].decode("utf-8")
    return coco


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``mode="islands"``) of fewer than
    ``area_thresh`` pixels, with 8-connected components.

    Holes are the components of the mask's complement, so a small *outer* background is
    filled too, as in segment-anything. When every island is small the largest one stays.

    Arguments:
        mask: (H, W) bool.
    Returns:
        the (H, W) bool mask and whether anything changed.
    """
    if mode not in ("holes", "islands"):
        raise SlimsegError(f"remove_small_regions mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (mask != holes).astype(np.uint8)
    labels_count, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is what `working` leaves out
    small = [label + 1 for label, size in enumerate(sizes) if size < area_thresh]
    if not small:
        return mask, False
    if holes:
        # Label 0 of the complement is the mask itself; add the small holes to it.
        keep = [0, *small]
    else:
        small_set = set(small)
        keep = [label for label in range(1, labels_count) if label not in small_set]
        if not keep:
            keep = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, keep), True
