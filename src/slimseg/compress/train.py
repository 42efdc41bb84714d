"""Supervised training on SA-1B masks: a whole model end to end, or an AutoPPN head.

``train(model, data, out_dir, config, stage)`` runs the same loop, files and resume as
``distill`` (``compress/training_loop.py``):

- ``stage="masks"``: every parameter of the model learns from prompted masks (point and box
  prompts, focal + dice + IoU losses) and, when the model has an AutoPPN, from its heatmap
  loss too; validated by point-prompt mIoU.
- ``stage="autoppn"``: only the AutoPPN head learns, on the frozen encoder's embeddings;
  validated by proposal recall. A SAM-family model without an AutoPPN gets a new one
  (SAM / SlimSAM + AutoPPN, Lite-SAM paper Table 3), saved with the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from slimseg.compress.checks import check_annotated, check_image_size, check_run_folder
from slimseg.validation import as_integer, as_real
from slimseg.compress.distill import point_miou_validator
from slimseg.compress.distill_config import DistillConfig, DistillResult
from slimseg.compress.distributed import process_group
from slimseg.compress.progress import TrainingProgress
from slimseg.compress.supervised import HeatmapSupervision, MaskSupervision
from slimseg.compress.training_loop import TrainingTask, load_resume_state, run_training
from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.modeling.autoppn import AutoPPNConfig
from slimseg.modeling.sam import Sam

__all__ = ["TRAIN_STAGES", "train", "with_autoppn"]

TRAIN_STAGES = ("masks", "autoppn")


def with_autoppn(model: nn.Module, config: AutoPPNConfig | None = None) -> nn.Module:
    """``model`` itself if it has an AutoPPN, else a SAM-family copy with a new (random) one
    over its embedding and every other weight kept."""
    if getattr(model, "autoppn", None) is not None:
        return model
    if not isinstance(model, Sam):
        raise SlimsegError(f"cannot attach an AutoPPN to a {type(model).__name__}")
    autoppn = config or AutoPPNConfig(in_chans=model.config.image_encoder.out_chans)
    extended = Sam(replace(model.config, autoppn=autoppn)).to(model.device)
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("autoppn.") for name in missing):
        raise SlimsegError("internal error: weights did not carry over to the model with AutoPPN")
    return extended


def _validator(stage: str, val: Dataset, limit: int | None) -> Callable[[nn.Module], float | dict[str, float]]:
    if stage == "masks":
        return point_miou_validator(val, limit)
    from slimseg.evaluation.proposal_recall import proposal_recall

    def recall(model: nn.Module) -> dict[str, float]:
        # Recall alone reads 1.0 on easy images even at chance: the recall of as many random
        # points, and how many points that is, say what it is worth.
        result = proposal_recall(model, val, limit=limit)
        return {"recall": result.recall, "random_recall": result.random_recall, "proposals": result.proposals}

    return recall


def _loss_label(stage: str, model: nn.Module, heatmap_weight: float) -> str:
    """The y axis of loss.png: what the objective sums (compress/supervised.py)."""
    if stage == "autoppn":
        return "loss (AutoPPN focal, per size group)"
    heatmap = " + AutoPPN focal" if getattr(model, "autoppn", None) is not None and heatmap_weight > 0 else ""
    return f"loss (20 x focal + dice + IoU MSE{heatmap})"


def train(
    model: nn.Module,
    data: Dataset,
    out_dir: str | Path,
    config: DistillConfig,
    stage: str = "masks",
    val: Dataset | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    max_masks: int = 16,
    heatmap_weight: float = 1.0,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    console: Console | None = None,
    overwrite: bool = False,
) -> tuple[nn.Module, DistillResult]:
    """Train ``model`` on an ``SA1BDataset`` built at its input size; returns the trained
    model (a new object when an AutoPPN had to be attached) and the run's result.

    Args:
        config: batch size, accumulation, lr, epochs, seed ... (its intermediate_* fields are
            for distillation and unused here).
        val: an ``SA1BDataset``: point-prompt mIoU (masks) or proposal recall (autoppn)
            drives the schedule and best.safetensors; without it the training loss does.
        max_masks: masks prompted per image and step (stage "masks").
        heatmap_weight: weight of the AutoPPN loss in stage "masks".
        overwrite: start afresh in an ``out_dir`` that holds a run or other files; without it
            (and without ``resume``) such a folder is refused, as ``slimseg train`` does.
    Under torchrun the process group is started here if needed, as ``distill`` does.
    """
    if stage not in TRAIN_STAGES:
        raise SlimsegError(f"unknown training stage {stage!r}: choose one of {', '.join(TRAIN_STAGES)}")
    config.validate()
    as_integer(max_masks, "max_masks", 1)
    as_real(heatmap_weight, "heatmap_weight", minimum=0)
    out_dir = Path(out_dir)
    check_run_folder(out_dir, resume or overwrite)
    # Before any epoch: a set without annotated objects would train on loss 0 or fail only
    # at the first validation.
    check_image_size(check_annotated(data, "train: data"), "train: data", model.img_size)
    if val is not None:
        item = check_annotated(val, "train: val", config.val_limit)
        if stage == "autoppn":  # proposal recall encodes the dataset's images (point mIoU re-reads the files)
            check_image_size(item, "train: val", model.img_size)
    with process_group() as (rank, world):
        target = resolve_device(device)
        if world > 1 and target.type == "cuda":
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = model.to(target)
        settings = {"max_masks": max_masks, "heatmap_weight": heatmap_weight} if stage == "masks" else {}
        if stage == "autoppn":
            model = with_autoppn(model)
            model.requires_grad_(False)
            model.autoppn.requires_grad_(True)
            objective, trained = HeatmapSupervision(model), model.autoppn
        else:
            model.requires_grad_(True)
            objective, trained = MaskSupervision(model, max_masks, heatmap_weight, seed=config.seed), model
        task = TrainingTask(kind=stage, model=model, objective=objective, trained=trained,
                            validate=_validator(stage, val, config.val_limit) if val is not None else None,
                            val_name="miou" if stage == "masks" else "recall",
                            val_extras=() if stage == "masks" else ("random_recall", "proposals"),
                            loss_label=_loss_label(stage, model, heatmap_weight),
                            title="AutoPPN loss" if stage == "autoppn" else "Mask loss",
                            extra_state=settings, frozen_name="the model's weights outside its AutoPPN")
        state = load_resume_state(out_dir, stage, model, config, task.mode, settings) if resume else None
        progress = TrainingProgress(console, enabled=rank == 0)
        return model, run_training(task, data, out_dir, config, target, state, progress, on_epoch_end)
