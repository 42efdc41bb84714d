"""Point-prompt mIoU, the validation metric of SlimSAM's pruning and distillation.

Every ground-truth mask is prompted with its single positive point (SA-1B's
``point_coords``), decoded with one output mask, and scored by IoU against the
ground truth. An image scores the mean over its masks; the dataset scores the mean over
images, so images with many masks do not dominate.
"""

from __future__ import annotations

import torch

from slimseg.data.datasets import Annotation, SA1BDataset
from slimseg.data.images import read_image
from slimseg.errors import SlimsegError
from slimseg.inference.masks import decode_rle
from slimseg.inference.predictor import Predictor

__all__ = ["mask_iou", "point_prompt_ious", "point_prompt_miou"]


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| of binary masks, 0 where the union is empty.

    Args:
        pred, target: (..., H, W) masks (bool, or non-zero means inside), broadcastable.

    Returns:
        float32 (...) IoUs.
    """
    pred, target = pred.bool(), target.bool()
    intersection = (pred & target).sum(dim=(-2, -1)).float()
    union = (pred | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def point_prompt_ious(
    predictor: Predictor,
    dataset: SA1BDataset,
    limit: int | None = None,
    points_per_batch: int = 64,
) -> list[float]:
    """The mean point-prompt IoU of each scored image, in dataset order.

    Args:
        predictor: wraps the model to evaluate, on any device; its image is reset afterwards.
        dataset: SA-1B items; ``None`` items and items without annotations are skipped.
        limit: visit only the first ``limit`` items of the dataset.
        points_per_batch: prompts decoded per mask-decoder call; bounds memory on large
            images with hundreds of masks without changing the result.

    Returns:
        One float per image that has at least one annotation.
    """
    if limit is not None and limit <= 0:
        raise SlimsegError(f"limit must be positive, got {limit}")
    if points_per_batch <= 0:
        raise SlimsegError(f"points_per_batch must be positive, got {points_per_batch}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    scores: list[float] = []
    try:
        for index in range(count):
            item = dataset[index]
            if item is None or not item["annotations"]:
                continue
            predictor.set_image(read_image(item["path"]))
            ious = [
                _batch_ious(predictor, item["annotations"][start : start + points_per_batch])
                for start in range(0, len(item["annotations"]), points_per_batch)
            ]
            scores.append(float(torch.cat(ious).mean()))
    finally:
        # The embedding of the last image is large and useless to the caller.
        predictor.reset_image()
    return scores


def point_prompt_miou(
    predictor: Predictor,
    dataset: SA1BDataset,
    limit: int | None = None,
    points_per_batch: int = 64,
) -> float:
    """Mean over images of the per-image mean point-prompt IoU (see ``point_prompt_ious``).

    Raises:
        SlimsegError: no visited image had a readable annotated item.
    """
    scores = point_prompt_ious(predictor, dataset, limit, points_per_batch)
    if not scores:
        raise SlimsegError(f"{dataset.root}: no readable image with annotations to evaluate")
    return sum(scores) / len(scores)


def _batch_ious(predictor: Predictor, annotations: list[Annotation]) -> torch.Tensor:
    """(N,) IoUs of N one-point prompts against their ground-truth masks, on the CPU."""
    device = predictor.device
    points = torch.tensor([[annotation.point] for annotation in annotations], dtype=torch.float, device=device)
    coords = predictor.transform.apply_coords_torch(points, predictor.original_size)
    labels = torch.ones(points.shape[:2], dtype=torch.int, device=device)
    # predict_torch thresholds at the model's own mask_threshold.
    masks, _, _ = predictor.predict_torch(coords, labels, multimask_output=False)
    targets = torch.stack([torch.from_numpy(decode_rle(a.mask_rle)) for a in annotations]).to(device)
    return mask_iou(masks[:, 0], targets).cpu()
