"""SlimSAM's alternate slimming: prune one sub-structure, distil, prune the other, distil.

    embedding pruning → bottleneck aligning → bottleneck pruning → embedding aligning

Each pruning step ranks channels with an importance criterion (disturbed Taylor by
default, whose gradients come from the same distillation objective that follows it).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from slimseg.validation import as_integer
from slimseg.compress.distill import DistillConfig, check_distill_data, distill
from slimseg.compress.importance import (
    GRADIENT_IMPORTANCES,
    IMPORTANCE_CHOICES,
    accumulate_disturbed_gradients,
    make_importance,
)
from slimseg.compress.prune import PruneReport, check_pruning, default_round_to, prune_image_encoder
from slimseg.compress.ratio_limits import RatioOutOfReach, highest_ratio
from slimseg.data.datasets import collate_images
from slimseg.errors import SlimsegError, UsageError
from slimseg.modeling.sam import Sam

STAGE_CHOICES = ("embedding", "bottleneck", "both")
# IMPORTANCE_CHOICES less plain taylor, whose gradient is zero in every step here (see check)
SLIMMING_IMPORTANCES = tuple(name for name in IMPORTANCE_CHOICES if name != "taylor")
# After pruning one sub-structure, distillation aligns the features that pruning left intact.
_ALIGN_AFTER = {"embedding": "bottleneck", "bottleneck": "embedding"}
DISTURB_SIGMA = 0.01


@dataclass(frozen=True)
class SlimmingPlan:
    """What ``alternate_slimming`` does; defaults are SlimSAM's."""

    ratio: float
    stage: str = "both"
    mode: str = "local"
    importance: str = "disturbed-taylor"
    grad_images: int = 1000
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(epochs=20))
    distill_epochs: int = 20  # per aligning step; 0 prunes only

    def stages(self) -> tuple[str, ...]:
        if self.stage not in STAGE_CHOICES:
            raise SlimsegError(f"unknown stage {self.stage!r}: choose one of {', '.join(STAGE_CHOICES)}")
        return ("embedding", "bottleneck") if self.stage == "both" else (self.stage,)

    def check(self, teacher: Sam) -> tuple[str, ...]:
        """Refuse, before the gradient pass (minutes to hours), anything a later step would:
        returns the stages. The ratio's ceiling is exact up front: pruning one sub-structure
        leaves the widths of the other as they were."""
        stages = self.stages()
        if self.importance not in IMPORTANCE_CHOICES:
            raise SlimsegError(f"unknown importance {self.importance!r}; "
                               f"choose one of {', '.join(SLIMMING_IMPORTANCES)}")
        if self.importance == "taylor":
            # Each step's reference is a copy of the model it prunes, so the noiseless gradient is zero.
            raise SlimsegError("importance 'taylor' has a zero gradient here (each pruning step's reference equals "
                               "the model it prunes): use disturbed-taylor, magnitude or random")
        as_integer(self.grad_images, "grad_images", 1)
        as_integer(self.distill_epochs, "distill_epochs", 0)
        if self.distill_epochs > 0:
            replace(self.distill, epochs=self.distill_epochs).validate()
        else:
            as_integer(self.distill.seed, "distill: seed")  # seeds the gradient noise and random importance
        check_prunable(teacher)
        for stage in stages:
            try:
                check_pruning(teacher, self.ratio, stage, self.mode)
            except RatioOutOfReach as error:
                # the ceiling of the whole plan, not of the stage that failed first
                round_to = default_round_to(teacher.image_encoder)
                highest = min(highest_ratio(teacher.image_encoder, other, self.mode, round_to) for other in stages)
                raise RatioOutOfReach(error.reason, highest) from None
        return stages


@dataclass
class SlimmingResult:
    model: Sam
    reports: list[PruneReport]


def _gradient_batches(data: Dataset, limit: int, device: torch.device,
                      console: Console | None) -> Iterator[torch.Tensor]:
    """Up to ``limit`` preprocessed images, one at a time, unreadable ones skipped, with a
    progress bar on ``console`` (a terminal only)."""
    loader = DataLoader(data, batch_size=1, shuffle=False, collate_fn=collate_images)
    batches = itertools.islice((batch["image"].to(device) for batch in loader if batch is not None), limit)
    console = console or Console(stderr=True)
    columns = (TextColumn("gradients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("gradients", total=min(limit, len(data)))
        for batch in batches:
            yield batch
            progress.advance(task)


def check_prunable(model: Sam, name: str = "the model") -> None:
    """Only SAM's ViT encoder can be pruned; say so before the minutes of gradients."""
    from slimseg.modeling.sam.image_encoder import ImageEncoderViT

    encoder = getattr(model, "image_encoder", None)
    if not isinstance(encoder, ImageEncoderViT):
        raise UsageError(f"{name}: pruning needs a SAM or SlimSAM model (ViT image encoder), "
                         f"not one with a {type(encoder).__name__} encoder")


def alternate_slimming(
    teacher: Sam,
    data: Dataset,
    plan: SlimmingPlan,
    work_dir: Path,
    device: torch.device,
    val: Dataset | None = None,
    console: Console | None = None,
    on_step: Callable[[str], None] | None = None,
) -> SlimmingResult:
    """Prune a copy of ``teacher`` by ``plan`` and return it; ``teacher`` is left as it was.

    Distillation runs (one per pruning step when ``plan.distill_epochs > 0``) keep their
    checkpoints, metrics and loss curves under ``work_dir/<n>-<stage>-aligning``.
    """
    stages = plan.check(teacher)
    if plan.distill_epochs > 0 or plan.importance in GRADIENT_IMPORTANCES:
        check_distill_data(teacher, teacher, data, val if plan.distill_epochs > 0 else None, plan.distill.val_limit,
                           names=("prune: data", "prune: val"))
    teacher = teacher.to(device).eval()
    student = copy.deepcopy(teacher)
    reports = []
    for index, stage in enumerate(stages, start=1):
        announce = on_step or (lambda message: None)
        # Random scores come from the plan's seed, whatever the global RNG has been through.
        importance = make_importance(plan.importance, normalizer="gaussian" if plan.mode == "global" else "mean",
                                     generator=torch.Generator().manual_seed(plan.distill.seed + index))
        if plan.importance in GRADIENT_IMPORTANCES:
            # The reference is the model as it stands before this step (SlimSAM: SAM-B, then
            # the step-1 model); plain Taylor uses no noise, which needs student != reference.
            reference = copy.deepcopy(student).eval()
            sigma = DISTURB_SIGMA if plan.importance == "disturbed-taylor" else 0.0
            announce(f"step {index}: {plan.importance} gradients over up to {plan.grad_images} images")
            generator = torch.Generator(device=device).manual_seed(plan.distill.seed + index)
            accumulate_disturbed_gradients(student.image_encoder, reference.image_encoder,
                                           _gradient_batches(data, plan.grad_images, device, console), sigma, generator)
            del reference
        announce(f"step {index}: pruning the {stage} ({plan.mode}, ratio {plan.ratio})")
        reports.append(prune_image_encoder(student, plan.ratio, stage, mode=plan.mode, importance=importance))
        student.zero_grad(set_to_none=True)
        if plan.distill_epochs > 0:
            align = _ALIGN_AFTER[stage]
            announce(f"step {index}: {align} aligning for {plan.distill_epochs} epoch(s)")
            config = replace(plan.distill, epochs=plan.distill_epochs, align=align)
            # The aligning folders are this function's own: a rerun replaces them.
            distill(student, teacher, data, work_dir / f"{index}-{align}-aligning", config, val=val,
                    device=device, console=console, overwrite=True)
    return SlimmingResult(student.eval(), reports)
