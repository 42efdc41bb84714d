"""Objectives that learn from SA-1B masks: the whole model end to end, or AutoPPN alone.

Both read batches of ``SA1BDataset`` items (``"image"`` preprocessed at the model's input
size, ``"annotations"`` with each mask, its point and box, ``"original_size"``). See
``compress/objectives.py`` for the calling convention.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimseg.data.datasets import Annotation
from slimseg.errors import SlimsegError
from slimseg.inference.transforms import ResizeLongestSide
from slimseg.modeling.autoppn import autoppn_loss, autoppn_targets, group_names
from slimseg.validation import as_integer

__all__ = ["HeatmapSupervision", "MaskSupervision", "low_res_targets", "mask_loss"]

# SAM's training loss: focal and dice in a 20:1 ratio, plus an MSE on the predicted IoU.
FOCAL_WEIGHT = 20.0


def low_res_targets(masks: Sequence[np.ndarray], img_size: int, size: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
    """(N, h, w) float 0/1 targets in the decoder's low-res frame for (H, W) bool masks.

    The masks are resized and padded as the image is (longest side to ``img_size``, padding
    bottom/right), then area-averaged to ``size`` and thresholded at one half.
    """
    stacked = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in masks]))[:, None].to(device)
    height, width = stacked.shape[-2:]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, img_size)
    resized = F.interpolate(stacked, size=(new_h, new_w), mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, img_size - new_w, 0, img_size - new_h))
    return (F.interpolate(padded, size=size, mode="area")[:, 0] > 0.5).float()


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, C) per-candidate loss of (N, C, h, w) logits against (N, h, w) 0/1 targets:
    20 x sigmoid focal loss (alpha 0.25, gamma 2) + dice loss, each averaged per mask."""
    logits = logits.float()
    target = target[:, None].expand_as(logits)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean(dim=(-2, -1))
    dice = 1 - (2 * (prob * target).sum(dim=(-2, -1)) + 1) / (prob.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) + 1)
    return FOCAL_WEIGHT * focal + dice


def _hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, C) IoU of the thresholded logits with the targets (the IoU head's regression target)."""
    pred = logits.detach() > 0
    truth = target[:, None].bool()
    inter = (pred & truth).sum(dim=(-2, -1)).float()
    union = (pred | truth).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _heatmap_targets(model: nn.Module, annotations: list[list[Annotation]], sizes: list[tuple[int, int]],
                     heatmap: torch.Tensor) -> torch.Tensor:
    """(B, G, h, w) AutoPPN targets for every annotated mask of each image of the batch."""
    config = model.autoppn.config
    targets = [
        autoppn_targets([a.decode() for a in image_annotations], size, tuple(heatmap.shape[-2:]),
                        model.img_size, config.group_bounds)
        for image_annotations, size in zip(annotations, sizes)
    ]
    return torch.from_numpy(np.stack(targets)).to(heatmap.device)


class MaskSupervision(nn.Module):
    """End-to-end training of a whole model on SA-1B masks (SAM's recipe, simplified).

    Per image, up to ``max_masks`` annotations drawn at random are prompted alternately by
    their point (three candidates, the loss of the best one counts, as in SAM) and by their
    box (one candidate). Loss = 20·focal + dice per mask, plus the MSE between the predicted
    and the actual IoU, plus ``heatmap_weight`` times the AutoPPN loss when the model has one.
    """

    part_names = ("mask", "iou", "heatmap")

    def __init__(self, model: nn.Module, max_masks: int = 16, heatmap_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        as_integer(max_masks, "max_masks", 1)
        self.model, self.max_masks, self.heatmap_weight = model, max_masks, heatmap_weight
        self.transform = ResizeLongestSide(model.img_size)
        self.seed, self.epoch, self._seen = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch: the masks drawn depend only on
        (seed, epoch, image), so a run repeats with the same seed and resumes exactly."""
        self.epoch, self._seen = epoch, 0

    def _choose(self, count: int, image_key: str) -> list[int]:
        """Indices of up to ``max_masks`` of ``count`` annotations, from a generator of their own
        (not the global RNG, which --seed does not set and other code draws from)."""
        key = zlib.crc32(f"{self.seed}:{self.epoch}:{image_key}".encode())
        generator = torch.Generator().manual_seed(key)
        return torch.randperm(count, generator=generator)[: self.max_masks].tolist()

    def _prompted(self, embedding: torch.Tensor, annotations: list[Annotation],
                  original_size: tuple[int, int], image_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask loss, IoU loss) summed over this image's prompted masks."""
        model, device = self.model, embedding.device
        chosen = [annotations[i] for i in self._choose(len(annotations), image_key)]
        pe = model.prompt_encoder.get_dense_pe()
        mask_total = embedding.new_zeros(())
        iou_total = embedding.new_zeros(())
        for use_box, group in ((False, chosen[0::2]), (True, chosen[1::2])):
            if not group:
                continue
            if use_box:
                boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a.bbox_xywh for a in group)])
                boxes = torch.as_tensor(self.transform.apply_boxes(boxes, original_size), dtype=torch.float,
                                        device=device)
                sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
            else:
                points = self.transform.apply_coords(np.array([a.point for a in group]), original_size)
                coords = torch.as_tensor(points, dtype=torch.float, device=device)[:, None]
                labels = torch.ones(len(group), 1, dtype=torch.int, device=device)
                sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            logits, iou_pred = model.mask_decoder(image_embeddings=embedding, image_pe=pe,
                                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                  multimask_output=not use_box)
            target = low_res_targets([a.decode() for a in group], model.img_size, tuple(logits.shape[-2:]), device)
            losses = mask_loss(logits, target)
            best = losses.argmin(dim=1, keepdim=True)
            mask_total = mask_total + losses.gather(1, best).sum()
            actual = _hard_iou(logits, target).gather(1, best)
            iou_total = iou_total + F.mse_loss(iou_pred.float().gather(1, best), actual, reduction="sum")
        return mask_total, iou_total

    def forward(self, batch: dict, weight: float | None = None) -> tuple[torch.Tensor, tuple[float, ...]]:
        embeddings = self.model.image_encoder(batch["image"])
        mask_total = iou_total = embeddings.sum() * 0.0  # keeps a graph when no image has masks
        prompted = 0
        for index, image_annotations in enumerate(batch["annotations"]):
            # the image's path names it whatever the batching; items without one are counted
            image_key = str(batch["path"][index]) if "path" in batch else f"#{self._seen}"
            self._seen += 1
            if image_annotations:
                masks, ious = self._prompted(embeddings[index : index + 1], image_annotations,
                                             tuple(batch["original_size"][index]), image_key)
                mask_total, iou_total = mask_total + masks, iou_total + ious
                prompted += min(len(image_annotations), self.max_masks)
        mask_term, iou_term = mask_total / max(prompted, 1), iou_total / max(prompted, 1)
        loss = mask_term + iou_term
        heatmap_value = math.nan
        if self.model.autoppn is not None:
            logits = self.model.autoppn(embeddings)
            target = _heatmap_targets(self.model, batch["annotations"], batch["original_size"], logits)
            heatmap = autoppn_loss(logits, target)["loss"]
            loss = loss + self.heatmap_weight * heatmap
            heatmap_value = float(heatmap.detach())
        return loss, (float(mask_term.detach()), float(iou_term.detach()), heatmap_value)


class HeatmapSupervision(nn.Module):
    """AutoPPN alone on a frozen encoder's embeddings: the focal heatmap loss, one term per
    size group (small / medium / large objects), with ground truth from the distance
    transform of each mask (``modeling/autoppn.py``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "autoppn", None) is None:
            raise SlimsegError("HeatmapSupervision needs a model with an AutoPPN")
        self.model = model
        self.part_names = group_names(model.autoppn.config.num_groups)

    def train(self, mode: bool = True) -> "HeatmapSupervision":
        super().train(False)
        self.model.autoppn.train(mode)  # the frozen encoder keeps its eval-mode behaviour
        return self

    def forward(self, batch: dict, weight: float | None = None) -> tuple[torch.Tensor, tuple[float, ...]]:
        with torch.no_grad():
            embeddings = self.model.image_encoder(batch["image"])
        logits = self.model.autoppn(embeddings.float())
        target = _heatmap_targets(self.model, batch["annotations"], batch["original_size"], logits)
        losses = autoppn_loss(logits, target)
        return losses["loss"], tuple(float(losses[f"loss_{name}"].detach()) for name in self.part_names)
