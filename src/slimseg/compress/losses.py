"""SlimSAM's aligning losses: final-embedding MSE plus intermediate features caught by hooks.

The intermediate ("bottleneck aligning") terms compare features that have the same shape
in the student and the teacher. Which features those are is decided once, from a dry
forward pass, so the same code serves a step-1 student (embedding dim pruned: q/k/v and
MLP hidden widths still match the teacher's) and a step-2 student (bottleneck widths
pruned: only the residual stream still matches).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.errors import SlimsegError

__all__ = ["FeaturePair", "FeatureTaps", "candidate_features", "match_features", "mse"]

# Per-block features SlimSAM aligns in step 1; their widths are the bottleneck dims.
_BOTTLENECK_FEATURES = ("attn.q", "attn.k", "attn.v", "mlp.act")
ALIGN_CHOICES = ("auto", "bottleneck", "embedding")


@dataclass(frozen=True)
class FeaturePair:
    """One intermediate term: the module named ``name`` in both encoders, and its output shape."""

    name: str
    shape: tuple[int, ...]


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error computed in float32, so autocast's half precision stays out of the loss."""
    return F.mse_loss(student.float(), teacher.float())


def candidate_features(encoder: nn.Module) -> list[tuple[str, list[str]]]:
    """Per-block candidate module names, as (fallback, bottleneck names) pairs.

    Only encoders with a ``blocks`` ModuleList (ViT-style) have candidates; for any other
    encoder the list is empty and training uses the embedding loss alone. The fallback is
    the block itself, whose output is the residual stream.
    """
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    names = dict(encoder.named_modules())
    candidates = []
    for index in range(len(blocks)):
        block = f"blocks.{index}"
        candidates.append((block, [f"{block}.{part}" for part in _BOTTLENECK_FEATURES if f"{block}.{part}" in names]))
    return candidates


class FeatureTaps:
    """Forward hooks that keep the outputs of chosen submodules of one encoder.

    Captured tensors keep their autograd graph (student) or not (teacher under no_grad);
    ``clear`` drops them after each loss so that no activation outlives its step.
    """

    def __init__(self, encoder: nn.Module, names: Iterable[str]) -> None:
        modules = dict(encoder.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def keep(_module: nn.Module, _inputs: object, output: object) -> None:
            if self.enabled and isinstance(output, torch.Tensor):
                self.outputs[name] = output

        return keep

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


@torch.no_grad()
def match_features(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                   align: str = "auto") -> list[FeaturePair]:
    """The intermediate features whose output shapes agree, found with one dry forward of ``images``.

    ``align="bottleneck"`` uses, per block, each bottleneck feature (q, k, v, MLP activation)
    whose shape matches (SlimSAM's bottleneck aligning); ``"embedding"`` uses each block's
    output, the residual stream (embedding aligning); ``"auto"`` takes the bottleneck features
    and adds the block output when any of them does not match. Blocks that exist in only one
    encoder are ignored.

    Args:
        images: (B, 3, S, S) preprocessed images; one image is enough.
    """
    if align not in ALIGN_CHOICES:
        raise SlimsegError(f"unknown alignment {align!r}: choose one of {', '.join(ALIGN_CHOICES)}")
    student_candidates = dict(candidate_features(student))
    teacher_names = set(dict(teacher.named_modules()))
    names = [
        name
        for block, parts in student_candidates.items()
        for name in [block, *parts]
        if name in teacher_names
    ]
    if not names:
        return []
    student_taps, teacher_taps = FeatureTaps(student, names), FeatureTaps(teacher, names)
    was_training = student.training
    student.eval()
    try:
        student(images)
        teacher(images)
        shapes = {
            name: tuple(student_taps.outputs[name].shape)
            for name in names
            if name in student_taps.outputs
            and name in teacher_taps.outputs
            and student_taps.outputs[name].shape == teacher_taps.outputs[name].shape
        }
    finally:
        student_taps.remove()
        teacher_taps.remove()
        student.train(was_training)
    pairs = []
    for block, parts in student_candidates.items():
        matched = [name for name in parts if name in shapes] if align != "embedding" else []
        pairs.extend(FeaturePair(name, shapes[name]) for name in matched)
        use_block = align == "embedding" or (align == "auto" and (len(matched) < len(parts) or not parts))
        if use_block and block in shapes:
            pairs.append(FeaturePair(block, shapes[block]))
    return pairs


def intermediate_loss(student_taps: FeatureTaps, teacher_taps: FeatureTaps, pairs: list[FeaturePair]) -> torch.Tensor:
    """Mean over ``pairs`` of the MSE between the captured student and teacher features."""
    terms = [mse(student_taps.outputs[pair.name], teacher_taps.outputs[pair.name]) for pair in pairs]
    return torch.stack(terms).mean()
