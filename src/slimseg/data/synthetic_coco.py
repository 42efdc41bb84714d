"""A small COCO-layout folder for tests and examples: real JPEGs, polygon annotations,
uncompressed-RLE crowd regions, non-contiguous image and category ids, as COCO has them."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from slimseg.data.synthetic import _check, _draw, _save_jpeg

__all__ = ["write_coco_folder"]

# COCO's category ids are not contiguous; ours are not either, so id/index mix-ups show.
_CATEGORIES = ({"id": 1, "name": "blob", "supercategory": "shape"},
               {"id": 3, "name": "patch", "supercategory": "shape"})


def write_coco_folder(
    root: Path,
    count: int,
    split: str = "val2017",
    size: tuple[int, int] = (240, 320),
    seed: int = 0,
    objects: int = 5,
) -> Path:
    """Write ``root/<split>/<id:012d>.jpg`` and ``root/annotations/instances_<split>.json``.

    Args:
        root: folder to write into (created if needed).
        count: number of images; image ids are 100, 107, 114, ...
        split: split name, used for the image folder and the annotation file name.
        size: (H, W) of the first image; the second is transposed (W x H) and the third a
            third of the size, in turn, so both orientations and COCO's three area ranges occur.
        seed: the same seed writes the same files.
        objects: shapes per image, each one annotation; on even images with at least two
            shapes the last one is a crowd region (``iscrowd=1``, uncompressed RLE).

    Returns:
        The annotation file's path.
    """
    _check(count, size, objects)
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        height, width = (size, size[::-1], (size[0] // 3, size[1] // 3))[index % 3]
        image, masks = _draw(rng, (height, width), objects)
        image_id = 100 + 7 * index
        name = f"{image_id:012d}.jpg"
        _save_jpeg(image, root / split / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for k, mask in enumerate(masks):
            crowd = index % 2 == 0 and len(masks) >= 2 and k == len(masks) - 1
            segmentation = _uncompressed_rle(mask) if crowd else _polygons(mask)
            rle = mask_utils.frPyObjects(segmentation, height, width)
            rle = rle if crowd else mask_utils.merge(rle)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": _CATEGORIES[k % len(_CATEGORIES)]["id"], "iscrowd": int(crowd),
                "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
    path = root / "annotations" / f"instances_{split}.json"
    payload = {"info": {"description": "slimseg synthetic COCO"}, "images": images, "annotations": annotations,
               "categories": [dict(c) for c in _CATEGORIES]}
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [x0, y0, x1, y1, ...] through the centres of the mask's outer boundary pixels."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # COCO coordinates are continuous (pixel i spans [i, i + 1]), so a pixel centre is i + 0.5.
    return [(contour.reshape(-1, 2).astype(float) + 0.5).ravel().tolist() for contour in contours if len(contour) >= 3]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}
