"""AutoPPN: Lite-SAM's automated prompt proposal network, as CenterNet-style point heatmaps.

It reads any SAM-family image embedding (B, C, h, w): LiteViT's 256x40x40 or SAM's 256x64x64.
There is one heatmap per object-size group (small / medium / large relative area); the target
peak of an object is its most interior pixel (distance-transform maximum), which always lies
inside the mask, unlike a box centre. Design notes and what the paper leaves open:
docs/lite-sam.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimseg.errors import SlimsegError
from slimseg.modeling.litevit import LiteViTBlock

GROUP_NAMES = ("small", "medium", "large")
DEFAULT_GROUP_BOUNDS = (0.05, 0.25)  # mask area / image area between the groups
HEATMAP_PRIOR_BIAS = -2.19  # CenterNet: sigmoid(-2.19) ~ 0.1, so the rare peaks do not swamp early training


@dataclass(frozen=True)
class AutoPPNConfig:
    """AutoPPN over a (B, in_chans, h, w) embedding.

    ``depth`` MSPM blocks of ``width`` channels form the stem; ``pool_sizes`` are larger than
    LiteViT's because the stem runs at stride 16, where a large object spans tens of cells.
    ``group_bounds`` (num_groups - 1 increasing area fractions) split objects into groups.
    ``top_k`` and ``score_threshold`` are the defaults of :meth:`AutoPPN.propose`.
    """

    in_chans: int = 256
    width: int = 64
    depth: int = 2
    mlp_ratio: float = 2.0
    pool_sizes: tuple[int, ...] = (3, 7, 15)
    layer_scale_init: float = 1.0
    num_groups: int = 3
    group_bounds: tuple[float, ...] = DEFAULT_GROUP_BOUNDS
    top_k: int = 256
    score_threshold: float = 0.05

    def validate(self) -> "AutoPPNConfig":
        if min(self.in_chans, self.width, self.num_groups, self.top_k) <= 0 or self.depth < 0:
            raise SlimsegError("AutoPPN in_chans, width, num_groups and top_k must be positive, depth >= 0")
        if self.mlp_ratio <= 0 or any(k < 1 or k % 2 == 0 for k in self.pool_sizes) or not self.pool_sizes:
            raise SlimsegError("AutoPPN mlp_ratio must be positive and pool_sizes odd and positive")
        _check_bounds(self.group_bounds, self.num_groups)
        if not 0.0 <= self.score_threshold < 1.0:
            raise SlimsegError(f"AutoPPN score_threshold must be in [0, 1), got {self.score_threshold}")
        return self


def _check_bounds(bounds: Sequence[float], num_groups: int) -> None:
    if len(bounds) != num_groups - 1 or any(not 0.0 < b < 1.0 for b in bounds) or list(bounds) != sorted(bounds):
        raise SlimsegError(
            f"group_bounds must be {num_groups - 1} increasing area fractions in (0, 1), got {tuple(bounds)}"
        )


def group_names(num_groups: int) -> tuple[str, ...]:
    """Names of the heatmap channels: small/medium/large for three groups."""
    return GROUP_NAMES if num_groups == len(GROUP_NAMES) else tuple(f"group{g}" for g in range(num_groups))


class PointProposals(NamedTuple):
    """Proposals for one image, best first: points (N, 2) xy in input-frame pixels, scores (N,)
    sigmoid peak heights, groups (N,) heatmap channel of each peak."""

    points: torch.Tensor
    scores: torch.Tensor
    groups: torch.Tensor


class AutoPPN(nn.Module):
    """Embedding (B, in_chans, h, w) → point-heatmap logits (B, num_groups, h, w)."""

    def __init__(self, config: AutoPPNConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width = config.width
        self.proj = nn.Conv2d(config.in_chans, width, 1)
        self.stem = nn.Sequential(
            *(LiteViTBlock(width, config.mlp_ratio, config.pool_sizes, config.layer_scale_init)
              for _ in range(config.depth))
        )
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, config.num_groups, 1),
        )
        nn.init.constant_(self.head[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.config.in_chans:
            raise SlimsegError(
                f"AutoPPN expects (B, {self.config.in_chans}, h, w) features, got {tuple(features.shape)}"
            )
        return self.head(self.stem(self.proj(features)))

    @torch.no_grad()
    def propose(
        self,
        features: torch.Tensor,
        input_size: int | tuple[int, int],
        valid_size: tuple[int, int] | None = None,
    ) -> list[PointProposals]:
        """Point prompts for each image of ``features`` with the config's top_k and threshold."""
        return propose_points(
            self(features), self.config.top_k, self.config.score_threshold, input_size, valid_size
        )


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or min(pair) <= 0:
        raise SlimsegError(f"{name} must be a positive int or (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


def size_group(area_fraction: float, group_bounds: Sequence[float] = DEFAULT_GROUP_BOUNDS) -> int:
    """0 (small) for area_fraction <= 5 %, 1 (medium) up to 25 %, 2 (large) above."""
    return sum(area_fraction > bound for bound in group_bounds)


def interior_peak(mask: np.ndarray) -> tuple[int, int, float]:
    """(row, col) of the most interior pixel of a non-empty bool mask and its distance to the
    background; the image border counts as background (the mask is padded with one zero pixel)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col), float(distance[row, col])


def _splat(heatmap: np.ndarray, row: int, col: int, radius: int) -> None:
    """Max-combine a Gaussian of CenterNet's sigma = (2 radius + 1) / 6 centred on (row, col),
    cut to the disc of ``radius`` cells."""
    sigma = (2 * radius + 1) / 6.0
    offsets = np.arange(-radius, radius + 1)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    gaussian = np.where(squared <= radius * radius, np.exp(-squared / (2 * sigma * sigma)), 0.0)
    height, width = heatmap.shape
    top, bottom = max(0, row - radius), min(height, row + radius + 1)
    left, right = max(0, col - radius), min(width, col + radius + 1)
    patch = gaussian[top - row + radius : bottom - row + radius, left - col + radius : right - col + radius]
    np.maximum(heatmap[top:bottom, left:right], patch, out=heatmap[top:bottom, left:right])


def autoppn_targets(
    masks: Sequence[np.ndarray],
    image_size: tuple[int, int],
    heatmap_size: int | tuple[int, int],
    input_size: int,
    group_bounds: Sequence[float] = DEFAULT_GROUP_BOUNDS,
) -> np.ndarray:
    """Ground-truth heatmaps (num_groups, h, w) float32 for one image.

    Arguments:
        masks: bool (H, W) object masks at the original image size ``image_size`` (H, W).
        heatmap_size: (h, w) of the heatmap, which covers the padded input square.
        input_size: side of the square encoder input; the image is resized so that its longest
            side is ``input_size`` and padded bottom/right, as the Predictor does.
    Each object adds a Gaussian to the channel of its size group (mask area / image area),
    peaking at exactly 1 on the cell holding its most interior pixel, with a radius of
    floor(interior distance in cells): the splat stays (to within a cell) inside the object's
    largest inscribed disc, so no positive-looking cell falls on a neighbour. Empty masks are
    skipped.
    """
    height, width = _pair(image_size, "image_size")
    rows, cols = _pair(heatmap_size, "heatmap_size")
    if input_size <= 0:
        raise SlimsegError(f"input_size must be positive, got {input_size}")
    _check_bounds(group_bounds, len(group_bounds) + 1)
    scale = input_size / max(height, width)
    stride_y, stride_x = input_size / rows, input_size / cols
    heatmaps = np.zeros((len(group_bounds) + 1, rows, cols), dtype=np.float32)
    for index, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise SlimsegError(f"mask {index} has shape {mask.shape}, expected the image size {(height, width)}")
        mask = mask.astype(bool)
        area = int(mask.sum())
        if area == 0:
            continue
        row, col, distance = interior_peak(mask)
        cell_row = min(rows - 1, int((row + 0.5) * scale / stride_y))
        cell_col = min(cols - 1, int((col + 0.5) * scale / stride_x))
        radius = int(distance * scale / max(stride_x, stride_y))
        group = size_group(area / (height * width), group_bounds)
        _splat(heatmaps[group], cell_row, cell_col, radius)
    return heatmaps


def autoppn_loss(
    pred_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    group_weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """CenterNet's penalty-reduced focal loss, computed and normalised per size group.

    Arguments:
        pred_logits, target: (B, G, h, w); target cells equal to 1 are the positives.
        group_weights: G weights of the per-group terms in the total (default all 1).
    Returns:
        ``loss_<group>`` per group (each divided by that group's number of positives, so the
        many small objects do not drown the few large ones) and ``loss``, the weighted sum.
    """
    if pred_logits.ndim != 4 or pred_logits.shape != target.shape:
        raise SlimsegError(
            f"autoppn_loss expects equal (B, G, h, w) shapes, got {tuple(pred_logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    groups = pred_logits.shape[1]
    weights = [1.0] * groups if group_weights is None else list(group_weights)
    if len(weights) != groups:
        raise SlimsegError(f"group_weights has {len(weights)} entries for {groups} groups")
    logits, target = pred_logits.float(), target.to(pred_logits.device, torch.float32)
    prob = torch.sigmoid(logits)
    positive = target >= 1.0
    # log-sigmoid of the logits stays finite where sigmoid rounds to 0 or 1
    pos_loss = -(1 - prob).pow(alpha) * F.logsigmoid(logits) * positive
    neg_loss = -(1 - target).pow(beta) * prob.pow(alpha) * F.logsigmoid(-logits) * ~positive
    per_group = (pos_loss + neg_loss).sum(dim=(0, 2, 3)) / positive.sum(dim=(0, 2, 3)).clamp(min=1)
    losses = {f"loss_{name}": per_group[g] for g, name in enumerate(group_names(groups))}
    losses["loss"] = sum(weight * per_group[g] for g, weight in enumerate(weights))
    return losses


def propose_points(
    logits: torch.Tensor,
    top_k: int = 256,
    score_threshold: float = 0.05,
    input_size: int | tuple[int, int] = 640,
    valid_size: tuple[int, int] | None = None,
) -> list[PointProposals]:
    """Peaks of (B, G, h, w) heatmap logits as point prompts, one list entry per image.

    A cell is a peak when it equals the maximum of its 3x3 neighbourhood in its group; where
    several groups peak on one cell only the highest is kept (they would be the same prompt).
    The ``top_k`` best peaks scoring strictly above ``score_threshold`` are returned, best
    first, as cell centres in the input frame of ``input_size`` pixels (the padded square); with
    ``valid_size`` (h, w) peaks in the padding beyond it are dropped.
    """
    if logits.ndim != 4:
        raise SlimsegError(f"propose_points expects (B, G, h, w) logits, got {tuple(logits.shape)}")
    if top_k <= 0:
        raise SlimsegError(f"top_k must be positive, got {top_k}")
    input_h, input_w = _pair(input_size, "input_size")
    batch, _, rows, cols = logits.shape
    heat = torch.sigmoid(logits.float())
    peaks = torch.where(heat == F.max_pool2d(heat, 3, stride=1, padding=1), heat, torch.zeros_like(heat))
    scores, groups = peaks.max(dim=1)
    scores, order = scores.reshape(batch, -1).topk(min(top_k, rows * cols), dim=1)
    groups = groups.reshape(batch, -1).gather(1, order)
    xs = (order % cols).float().add(0.5).mul(input_w / cols).sub(0.5)
    ys = (order // cols).float().add(0.5).mul(input_h / rows).sub(0.5)
    proposals = []
    for b in range(batch):
        keep = scores[b] > score_threshold
        if valid_size is not None:
            keep &= (xs[b] < valid_size[1]) & (ys[b] < valid_size[0])
        points = torch.stack([xs[b][keep], ys[b][keep]], dim=1)
        proposals.append(PointProposals(points, scores[b][keep], groups[b][keep]))
    return proposals
