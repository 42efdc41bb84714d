"""How well AutoPPN's proposals find the objects of annotated images.

An object counts as found when at least one proposed point falls inside its mask: that
point, given to the mask decoder, is a prompt on the object. Recall is found objects over
all annotated objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimseg.data.datasets import SA1BDataset
from slimseg.errors import SlimsegError

__all__ = ["ProposalRecall", "proposal_recall", "points_in_masks"]


@dataclass(frozen=True)
class ProposalRecall:
    """``recall`` = found / objects over the visited images; ``proposals`` is the mean
    number of points per image; ``random_recall`` is the recall of as many uniformly random
    points per image (seeded), the chance level the proposals must beat."""

    recall: float
    objects: int
    found: int
    images: int
    proposals: float
    random_recall: float


def points_in_masks(points: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """(M,) bool: whether any of the (N, 2) xy pixel points lies inside each (H, W) mask."""
    if len(points) == 0:
        return np.zeros(len(masks), dtype=bool)
    found = []
    for mask in masks:
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
        rows = np.clip(np.round(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
        found.append(bool(mask[rows, cols].any()))
    return np.array(found, dtype=bool)


@torch.no_grad()
def proposal_recall(model: nn.Module, dataset: SA1BDataset, limit: int | None = None, seed: int = 0) -> ProposalRecall:
    """Recall of ``model.propose_points`` on the items of an SA-1B dataset (built at the
    model's input size); ``None`` items and images without annotations are skipped."""
    if getattr(model, "autoppn", None) is None:
        raise SlimsegError("proposal recall needs a model with an AutoPPN")
    if limit is not None and limit <= 0:
        raise SlimsegError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    objects = found = random_found = images = total_points = 0
    device = model.device
    for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[index]
        if item is None or not item["annotations"]:
            continue
        if item["image"].shape[-1] != model.img_size:
            # checked on the first scored item: the encoder would fail with a raw shape error
            raise SlimsegError(f"proposal recall: the dataset gives {item['image'].shape[-1]} px images but the model "
                               f"takes {model.img_size} px; build the dataset with img_size={model.img_size}")
        embedding = model.image_encoder(item["image"][None].to(device))
        proposals = model.propose_points(embedding, valid_size=item["input_size"])[0]
        height, width = item["original_size"]
        input_h, input_w = item["input_size"]
        points = proposals.points.cpu().double().numpy() * np.array([width / input_w, height / input_h])
        masks = [annotation.decode() for annotation in item["annotations"]]
        random_points = rng.uniform(0, 1, (len(points), 2)) * np.array([width, height])
        objects += len(masks)
        found += int(points_in_masks(points, masks).sum())
        random_found += int(points_in_masks(random_points, masks).sum())
        images += 1
        total_points += len(points)
    if objects == 0:
        raise SlimsegError("proposal recall: no annotated object in the dataset")
    return ProposalRecall(found / objects, objects, found, images, total_points / images, random_found / objects)
