"""Point grids and image crops for the mask generator (segment-anything's layout)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from slimseg.errors import SlimsegError

__all__ = ["build_all_layer_point_grids", "build_point_grid", "generate_crop_boxes", "nonempty_crop_boxes", "uncrop_masks"]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) XY points in [0, 1]², the centres of an n x n tiling, row by row (x fastest)."""
    if n_per_side < 1:
        raise SlimsegError(f"a point grid needs at least 1 point per side, got {n_per_side}")
    half_step = 1 / (2 * n_per_side)
    ticks = np.linspace(half_step, 1 - half_step, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks, indexing="xy")
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers; layer i has int(n / scale**i) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**layer))) for layer in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crops of every layer: layer 0 is the whole image, layer i >= 1 a 2^i x 2^i tiling whose
    neighbours overlap by ``overlap_ratio`` of the short side (scaled down with 2^i).

    Arguments:
        image_size: (H, W).
    Returns:
        XYXY crop boxes (x1/y1 exclusive) and the layer index of each.
    """
    height, width = image_size
    short_side = min(height, width)
    boxes: list[list[int]] = [[0, 0, width, height]]
    layers = [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        # Tiles of equal length that cover the side exactly when stepped by (length - overlap).
        crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        lefts = [int((crop_w - overlap) * k) for k in range(per_side)]
        tops = [int((crop_h - overlap) * k) for k in range(per_side)]
        # Column-major over the tiling (x outer, y inner), as SAM orders them.
        for x0 in lefts:
            for y0 in tops:
                boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
                layers.append(layer)
    return boxes, layers


def nonempty_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """``generate_crop_boxes`` less the crops of zero width or height.

    segment-anything's tiling (kept as it is, for parity) yields such crops on images only a
    few pixels across: a 1-pixel-wide image split in two columns has an empty right column.
    They hold no pixels to segment, so the generator skips them.
    """
    boxes, layers = generate_crop_boxes(image_size, n_layers, overlap_ratio)
    kept = [index for index, (x0, y0, x1, y1) in enumerate(boxes) if x1 > x0 and y1 > y0]
    return [boxes[index] for index in kept], [layers[index] for index in kept]


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], height: int, width: int) -> torch.Tensor:
    """(N, h, w) masks of a crop → (N, H, W), zero outside the crop."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return masks
    full = masks.new_zeros((masks.shape[0], height, width))
    full[:, y0:y1, x0:x1] = masks
    return full
