"""Mask records in the format of segment-anything's automatic mask generator.

Masks are stored as COCO compressed RLE (pycocotools), with the bounding box in
SAM's convention, so our JSON output can be read by tools written for SAM's.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from slimseg.errors import SlimsegError

__all__ = ["decode_rle", "encode_rle", "mask_record", "mask_to_box_xywh"]

_RECORD_KEYS = frozenset({"segmentation", "area", "bbox", "score"})


def encode_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask as COCO compressed RLE.

    Args:
        mask: (H, W) array; non-zero means inside.

    Returns:
        ``{"size": [H, W], "counts": str}``; counts is the utf-8 text of pycocotools'
        compressed string, so the dict can be written to JSON as is.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    # pycocotools walks the pixels column by column, so it needs Fortran order.
    fortran = np.asfortranarray(mask.astype(bool, copy=False).astype(np.uint8))
    rle = mask_utils.encode(fortran)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("utf-8")}


def decode_rle(rle: dict) -> np.ndarray:
    """Decode COCO RLE (compressed str/bytes counts, or an uncompressed list) to a mask.

    Returns:
        (H, W) bool array.

    Raises:
        SlimsegError: the dict is not a valid RLE.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SlimsegError(f"invalid RLE: expected keys 'size' [h, w] and 'counts' ({exc})") from exc
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        text = counts.encode("utf-8") if isinstance(counts, str) else counts
        compressed = {"size": [height, width], "counts": text}
    else:
        raise SlimsegError(f"invalid RLE: 'counts' must be a string or a list, got {type(counts).__name__}")
    with warnings.catch_warnings():
        # pycocotools' Cython decoder trips numpy 2's "__array__ copy keyword"
        # deprecation on every call; the result is correct, the noise is not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*copy keyword")
        mask = mask_utils.decode(compressed)
    return np.ascontiguousarray(mask.astype(bool))


def mask_to_box_xywh(mask: np.ndarray) -> list[int]:
    """Tight box around the True pixels, as segment-anything's mask generator records it.

    SAM computes ``box_xyxy_to_xywh(batched_mask_to_box(mask))`` where x1/y1 are the
    last covered column/row (inclusive), so w = x1 - x0 and h = y1 - y0: a one-pixel
    mask has w = h = 0. This differs from COCO's +1 convention; we match SAM.

    Args:
        mask: (H, W) array; non-zero means inside.

    Returns:
        [x, y, w, h] in pixels; [0, 0, 0, 0] for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    inside = mask.astype(bool, copy=False)
    cols = np.flatnonzero(inside.any(axis=0))
    if cols.size == 0:
        return [0, 0, 0, 0]
    rows = np.flatnonzero(inside.any(axis=1))
    x0, x1 = int(cols[0]), int(cols[-1])
    y0, y1 = int(rows[0]), int(rows[-1])
    return [x0, y0, x1 - x0, y1 - y0]


def mask_record(mask: np.ndarray, score: float, **extra: Any) -> dict:
    """One JSON-ready record for a mask.

    Args:
        mask: (H, W) array; non-zero means inside.
        score: the model's quality estimate, kept at full float precision.
        **extra: further keys (e.g. ``point_coords``, ``stability_score``), added as is.

    Returns:
        ``{"segmentation": RLE, "area": int, "bbox": [x, y, w, h], "score": float, **extra}``.
    """
    clashes = _RECORD_KEYS.intersection(extra)
    if clashes:
        raise ValueError(f"extra keys clash with the record's own: {sorted(clashes)}")
    return {
        "segmentation": encode_rle(mask),
        "area": int(np.count_nonzero(mask)),
        "bbox": mask_to_box_xywh(mask),
        "score": float(score),
        **extra,
    }
