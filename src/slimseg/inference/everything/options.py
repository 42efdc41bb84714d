"""Checking the mask generator's arguments, each failure as one ``SlimsegError`` line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from slimseg.errors import SlimsegError
from slimseg.inference.everything.crops import build_all_layer_point_grids
from slimseg.validation import as_integer, as_real, real_problem

__all__ = ["MAX_CROP_N_LAYERS", "MAX_POINTS_PER_SIDE", "NUMBER_RANGES", "OUTPUT_MODES", "SAMPLERS",
           "check_generator_options", "number_problem"]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
SAMPLERS = ("grid", "autoppn")
# Upper bounds that keep one image's work within memory, far above any useful setting.
# 1024 points per side is a prompt per pixel of SAM's 1024-px input (1M prompts per crop, a
# 16 MB grid); more only repeats input pixels, and 100000 would need 160 GB for the grid alone.
MAX_POINTS_PER_SIDE = 1024
# Crop layer i adds 4^i crops, and the embeddings of all an image's crops are held at once:
# 4 layers make 341 crops (341 encoder passes, 1.4 GB of SAM's 256x64x64 float32 embeddings);
# 5 would make 1365 crops and 5.5 GB, 20 about 10^12.
MAX_CROP_N_LAYERS = 4
# (low, high or None, high end open) of the number arguments
NUMBER_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "pred_iou_thresh": (0.0, 1.0, False),
    "stability_score_thresh": (0.0, 1.0, False),
    "stability_score_offset": (0.0, None, False),
    "box_nms_thresh": (0.0, 1.0, False),
    "crop_nms_thresh": (0.0, 1.0, False),
    "crop_overlap_ratio": (0.0, 1.0, True),
    "min_mask_region_area": (0.0, None, False),
    "proposal_thresh": (0.0, 1.0, True),
}


def number_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``name`` (a key of NUMBER_RANGES), e.g. "must be in
    [0, 1]", or None when it is valid. ``slimseg segevery`` shares it to check its options
    under their command-line names before the model loads."""
    return real_problem(value, *NUMBER_RANGES[name])


def _number(name: str, value: Any) -> float:
    return as_real(value, name, *NUMBER_RANGES[name])


def _grids(point_grids: Sequence[np.ndarray], layers: int) -> list[np.ndarray]:
    if isinstance(point_grids, np.ndarray) or not isinstance(point_grids, Sequence):
        raise SlimsegError("point_grids must be a list of (N, 2) arrays, one per crop layer")
    if len(point_grids) < layers:
        raise SlimsegError(f"point_grids has {len(point_grids)} grid(s) but crop_n_layers needs {layers}")
    grids = []
    for layer, grid in enumerate(point_grids):
        array = np.asarray(grid, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2:
            raise SlimsegError(f"point_grids[{layer}] must have shape (N, 2), got {array.shape}")
        if not np.all((array >= 0) & (array <= 1)):
            raise SlimsegError(f"point_grids[{layer}] must hold XY points normalised to [0, 1]")
        grids.append(array)
    return grids


def check_generator_options(
    *,
    points_per_side: int | None,
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    box_nms_thresh: float,
    crop_n_layers: int,
    crop_nms_thresh: float,
    crop_overlap_ratio: float,
    crop_n_points_downscale_factor: int,
    point_grids: Sequence[np.ndarray] | None,
    min_mask_region_area: float,
    output_mode: str,
    sampler: str,
    point_proposer: Callable | None,
    max_proposals: int | None = None,
    proposal_thresh: float | None = None,
) -> list[np.ndarray]:
    """Validate everything; returns the per-layer point grids (empty for AutoPPN)."""
    if sampler not in SAMPLERS:
        raise SlimsegError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if output_mode not in OUTPUT_MODES:
        raise SlimsegError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
    as_integer(points_per_batch, "points_per_batch", 1)
    _number("pred_iou_thresh", pred_iou_thresh)
    _number("stability_score_thresh", stability_score_thresh)
    _number("stability_score_offset", stability_score_offset)
    _number("box_nms_thresh", box_nms_thresh)
    _number("crop_nms_thresh", crop_nms_thresh)
    _number("crop_overlap_ratio", crop_overlap_ratio)
    _number("min_mask_region_area", min_mask_region_area)
    layers = as_integer(crop_n_layers, "crop_n_layers", 0, MAX_CROP_N_LAYERS) + 1
    factor = as_integer(crop_n_points_downscale_factor, "crop_n_points_downscale_factor", 1)
    if point_proposer is not None and not callable(point_proposer):
        raise SlimsegError(f"point_proposer must be callable, got {type(point_proposer).__name__}")
    if (max_proposals is not None or proposal_thresh is not None) and (sampler != "autoppn" or point_proposer):
        raise SlimsegError("max_proposals and proposal_thresh apply to the model's own AutoPPN (sampler='autoppn')")
    if max_proposals is not None:
        as_integer(max_proposals, "max_proposals", 1)
    if proposal_thresh is not None:
        _number("proposal_thresh", proposal_thresh)

    if sampler == "autoppn":
        if point_grids is not None:
            raise SlimsegError("point_grids cannot be combined with sampler='autoppn' (AutoPPN proposes the points)")
        return []
    if point_proposer is not None:
        raise SlimsegError("point_proposer is only used with sampler='autoppn'")
    if (points_per_side is None) == (point_grids is None):
        raise SlimsegError("give exactly one of points_per_side and point_grids (set points_per_side=None for grids)")
    if point_grids is not None:
        return _grids(point_grids, layers)
    side = as_integer(points_per_side, "points_per_side", 1, MAX_POINTS_PER_SIDE)
    smallest = int(side / factor ** (layers - 1))
    if smallest < 1:
        raise SlimsegError(
            f"points_per_side={side} with crop_n_points_downscale_factor={factor} leaves no points "
            f"in crop layer {layers - 1}"
        )
    return build_all_layer_point_grids(side, layers - 1, factor)
