"""What a training run minimises, one ``nn.Module`` per objective.

Each objective is called as ``objective(batch, weight)`` on a collated batch (tensors already
on the device) and returns ``(loss, parts)``: the scalar to backpropagate and one float per
name in ``part_names`` (NaN for a term that is off in this step). Being a module, an
objective can be wrapped whole in DistributedDataParallel; only the parameters that require
gradients are trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.compress.losses import FeaturePair, FeatureTaps, intermediate_loss, mse
from slimseg.errors import SlimsegError

__all__ = ["EmbeddingDistillation", "match_embedding_size"]


def match_embedding_size(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The (B, C, h', w') teacher embedding resized to the student's (B, C, h, w) grid.

    A teacher at another input size (SAM at 1024 px: 64x64 tokens) and a student at its own
    (Lite-SAM at 640 px: 40x40) see the same image resized and padded the same way, so the
    two grids cover the same region and an antialiased bilinear resize aligns them.
    """
    if teacher.shape[:2] != student.shape[:2]:
        raise SlimsegError(f"distill: student embedding {tuple(student.shape)} cannot be aligned with the "
                           f"teacher's {tuple(teacher.shape)}: batch and channels must agree")
    if teacher.shape[-2:] == student.shape[-2:]:
        return teacher
    return F.interpolate(teacher.float(), size=tuple(student.shape[-2:]), mode="bilinear", align_corners=False,
                         antialias=True)


def checked_input(batch: dict, key: str, img_size: int | None, model: str) -> torch.Tensor:
    """``batch[key]``, the (B, 3, S, S) input of ``model``, refused unless S is ``img_size``."""
    where = "a batch" if "path" not in batch else "the batch of " + ", ".join(map(str, batch["path"]))
    if key not in batch:
        raise SlimsegError(f"distill: train: {where} has no {key} though the first item has one; "
                           "every item needs one")
    images = batch[key]
    if img_size is not None and tuple(images.shape[-2:]) != (img_size, img_size):
        height, width = images.shape[-2:]
        raise SlimsegError(f"distill: train: {where} gives {height}x{width} px {key} inputs but {model} takes "
                           f"{img_size} px, as the first item did")
    return images


class EmbeddingDistillation(nn.Module):
    """SlimSAM's aligning distillation: L = (1 - a)·MSE(E_s, E_t) + a·mean_k MSE(F_s^k, F_t^k)
    while the intermediate terms are on (``weight`` a is not None), else L = MSE(E_s, E_t).

    The student reads ``batch["image"]``, the teacher ``batch[teacher_key]``: "teacher_image"
    for a teacher with another input size (see ``ImageFolderDataset(teacher_img_size=...)``),
    whose embedding is then resized to the student's grid. With ``student_img_size`` and
    ``teacher_img_size`` given, every batch is checked against them, so that an item unlike
    the first (checked before the run) is a ``SlimsegError`` naming its file rather than a
    shape error deep inside an encoder.
    """

    part_names = ("embedding", "intermediate")

    def __init__(self, student_encoder: nn.Module, teacher_encoder: nn.Module, pairs: list[FeaturePair],
                 student_taps: FeatureTaps | None = None, teacher_taps: FeatureTaps | None = None,
                 teacher_key: str = "image", student_img_size: int | None = None,
                 teacher_img_size: int | None = None) -> None:
        super().__init__()
        self.student, self.teacher = student_encoder, teacher_encoder
        self.pairs, self.student_taps, self.teacher_taps = pairs, student_taps, teacher_taps
        self.teacher_key = teacher_key
        self.student_img_size, self.teacher_img_size = student_img_size, teacher_img_size
        self._set_taps(False)

    def _set_taps(self, enabled: bool) -> None:
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.enabled = enabled
                taps.clear()

    def train(self, mode: bool = True) -> "EmbeddingDistillation":
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: its norms and dropouts stay in eval mode
        return self

    def forward(self, batch: dict, weight: float | None) -> tuple[torch.Tensor, tuple[float, float]]:
        images = checked_input(batch, "image", self.student_img_size, "the student")
        teacher_images = checked_input(batch, self.teacher_key, self.teacher_img_size, "the teacher")
        self._set_taps(weight is not None)
        try:
            with torch.no_grad():
                target = self.teacher(teacher_images)
            prediction = self.student(images)
            embedding = mse(prediction, match_embedding_size(target, prediction))
            if weight is None:
                return embedding, (float(embedding.detach()), math.nan)
            inter = intermediate_loss(self.student_taps, self.teacher_taps, self.pairs)
            loss = (1.0 - weight) * embedding + weight * inter
            return loss, (float(embedding.detach()), float(inter.detach()))
        finally:
            # Validation forwards must not fill the hooks with features nobody reads.
            self._set_taps(False)
