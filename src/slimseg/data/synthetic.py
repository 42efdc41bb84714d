"""Small synthetic image folders, including SA-1B layout, for tests and documentation examples.

Images are real JPEG files: a textured background with a few filled ellipses and rectangles
of distinct colours. The SA-1B JSON beside each image follows the released schema, with
one annotation per shape whose point prompt is the shape's most interior pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from slimseg.errors import SlimsegError
from slimseg.inference.masks import encode_rle, mask_to_box_xywh
from slimseg.validation import as_integer

__all__ = ["synthetic_image", "write_image_folder", "write_sa1b_folder"]

# Saturated colours far from each other and from the grey background, so shapes stay
# separable after JPEG compression.
_PALETTE = np.array(
    [
        [220, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 20], [200, 40, 210],
        [20, 210, 220], [250, 130, 10], [120, 20, 90], [10, 90, 60], [250, 250, 250],
    ],
    dtype=np.uint8,
)
_MIN_SIDE = 16
# Attempts to place one shape without touching the others before giving up on it.
_PLACEMENT_TRIES = 100


def synthetic_image(size: tuple[int, int] = (96, 128), seed: int = 0, objects: int = 3) -> np.ndarray:
    """One (H, W, 3) uint8 RGB image of the folders' kind, in memory; the same seed gives the
    same pixels."""
    _check(1, size, objects)
    return _draw(np.random.default_rng(seed), size, objects)[0]


def write_image_folder(
    root: Path, count: int, size: tuple[int, int] = (96, 128), seed: int = 0
) -> list[Path]:
    """Write ``count`` JPEG images ``img_000.jpg``, ``img_001.jpg``, … of (H, W) ``size``.

    Returns:
        The written paths, in name order. The same seed writes the same files.
    """
    _check(count, size, objects=0)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        image, _ = _draw(rng, size, objects=3)
        path = root / f"img_{index:03d}.jpg"
        _save_jpeg(image, path)
        paths.append(path)
    return paths


def write_sa1b_folder(
    root: Path, count: int, size: tuple[int, int] = (96, 128), seed: int = 0, objects: int = 3
) -> list[Path]:
    """Write ``count`` SA-1B style pairs ``sa_<n>.jpg`` + ``sa_<n>.json`` (n = 1 … count).

    Args:
        root: folder to write into (created if needed).
        count: number of images.
        size: (H, W) of every image.
        seed: the same seed writes the same files.
        objects: shapes per image; each becomes one annotation (0 gives empty annotation lists).
            A shape that finds no free room is left out, so small images may hold fewer.

    Returns:
        The image paths, in the order written.
    """
    _check(count, size, objects)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    paths = []
    for number in range(1, count + 1):
        image, masks = _draw(rng, size, objects)
        path = root / f"sa_{number}.jpg"
        _save_jpeg(image, path)
        record = {
            "image": {"image_id": number, "width": width, "height": height, "file_name": path.name},
            "annotations": [_annotation(mask, number * 1000 + k) for k, mask in enumerate(masks)],
        }
        path.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")
        paths.append(path)
    return paths


def _annotation(mask: np.ndarray, annotation_id: int) -> dict:
    """One annotation in SA-1B's schema for a (H, W) bool mask."""
    height, width = mask.shape
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return {
        "id": annotation_id,
        "segmentation": encode_rle(mask),
        "bbox": [float(v) for v in mask_to_box_xywh(mask)],
        "area": int(mask.sum()),
        "predicted_iou": 1.0,
        "point_coords": [[float(x), float(y)]],
        "crop_box": [0.0, 0.0, float(width), float(height)],
        "stability_score": 1.0,
    }


def _draw(rng: np.random.Generator, size: tuple[int, int], objects: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A (H, W, 3) uint8 RGB image and the (H, W) bool masks of its non-overlapping shapes."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Low-contrast grey gradient plus noise: texture for the encoder, far from the palette.
    base = 110 + 30 * (xs / width) + 20 * (ys / height)
    image = base[:, :, None] + rng.normal(0.0, 6.0, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    colours = rng.permutation(len(_PALETTE))
    occupied = np.zeros((height, width), bool)
    masks: list[np.ndarray] = []
    for _ in range(objects):
        mask = _place_shape(rng, occupied)
        if mask is None:
            continue
        image[mask] = _PALETTE[colours[len(masks) % len(_PALETTE)]]
        # Keep a one-pixel gap so neighbouring shapes never share an edge.
        occupied |= cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        masks.append(mask)
    return image, masks


def _place_shape(rng: np.random.Generator, occupied: np.ndarray) -> np.ndarray | None:
    height, width = occupied.shape
    small, large = max(3, min(height, width) // 10), max(4, min(height, width) // 4)
    for _ in range(_PLACEMENT_TRIES):
        canvas = np.zeros((height, width), np.uint8)
        half_w, half_h = int(rng.integers(small, large + 1)), int(rng.integers(small, large + 1))
        cx = int(rng.integers(half_w, width - half_w))
        cy = int(rng.integers(half_h, height - half_h))
        if rng.random() < 0.5:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(canvas, (cx, cy), (half_w, half_h), angle, 0, 360, 1, thickness=-1)
        else:
            cv2.rectangle(canvas, (cx - half_w, cy - half_h), (cx + half_w, cy + half_h), 1, thickness=-1)
        mask = canvas.astype(bool)
        if mask.any() and not (mask & occupied).any():
            return mask
    return None


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=95)


def _check(count: int, size: tuple[int, int], objects: int) -> None:
    as_integer(count, "count", 0)
    as_integer(objects, "objects", 0)
    if len(size) != 2 or min(size) < _MIN_SIDE:
        raise SlimsegError(f"size must be (height, width) with both >= {_MIN_SIDE}, got {tuple(size)}")
