"""``slimseg train``: supervised training on SA-1B masks (Lite-SAM end to end, AutoPPN heads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from slimseg.cli.common import DeviceOption, OfflineOption, console, user_errors
from slimseg.cli.compress import (
    AccumOption,
    AmpOption,
    BatchOption,
    LimitOption,
    LrOption,
    WorkersOption,
    check_input_folders,
    check_resume_before_loading,
    check_run_folder,
    device_for_rank,
    starting_model,
)
from slimseg.errors import SlimsegError, UsageError


def _check_annotated(option: str, dataset) -> None:
    """A folder without a single annotated object cannot train or validate anything: say so
    before an epoch is spent (and not as a metric's internal complaint)."""
    for index in range(len(dataset)):
        if dataset.annotation_count(index) > 0:
            return
    raise SlimsegError(f"{option} {dataset.root}: no image has an annotated object with a point prompt "
                       "(every sa_*.json annotation list is empty or unreadable)")


def train(
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME|PATH", help="Model to train: a checkpoint in any supported format, a registered name with weights, or lite-sam (random initialisation; distil its encoder first with `slimseg distill --student lite-sam`).")] = "lite-sam",
    stage: Annotated[str, typer.Option("--stage", metavar="masks|autoppn", help="masks: the whole model learns from point and box prompts on the masks (plus the AutoPPN heatmap if the model has one); autoppn: only an AutoPPN head learns, on the frozen encoder (a SAM or SlimSAM model gets a new one).")] = "masks",
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="SA-1B folder: sa_*.jpg with sa_*.json masks.", show_default=False)] = ...,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Run folder: last.ckpt (resumable), best.safetensors, final.safetensors, metrics.jsonl, loss.png.", show_default=False)] = ...,
    val: Annotated[Optional[Path], typer.Option("--val", metavar="DIR", help="SA-1B folder for validation: point-prompt mIoU (masks) or proposal recall (autoppn) drives the schedule and best.safetensors.", show_default=False)] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 10,
    max_masks: Annotated[int, typer.Option("--max-masks", min=1, help="Masks prompted per image and step (stage masks).")] = 16,
    heatmap_weight: Annotated[float, typer.Option("--heatmap-weight", min=0.0, help="Weight of the AutoPPN loss in stage masks.")] = 1.0,
    batch_size: BatchOption = 1,
    grad_accum: AccumOption = 4,
    lr: LrOption = 1e-4,
    amp: AmpOption = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.ckpt.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shuffling and mask sampling.")] = 0,
    limit: LimitOption = None,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
) -> None:
    """Train a model on SA-1B masks: Lite-SAM end to end, or an AutoPPN point proposer.

    Runs on many GPUs or machines unchanged under `torchrun --nproc_per_node N`.
    """
    from slimseg.compress.distill_config import DistillConfig
    from slimseg.compress.distributed import init_distributed_from_env
    from slimseg.compress.train import TRAIN_STAGES, train as run_training
    from slimseg.data.datasets import SA1BDataset
    from slimseg.devices import resolve_device

    with user_errors():
        if stage not in TRAIN_STAGES:
            raise UsageError(f"--stage {stage!r}: choose one of {', '.join(TRAIN_STAGES)}")
        check_run_folder(out, resume)
        check_input_folders(data=data, val=val)
        if resume:
            check_resume_before_loading(out, epochs)
        target = resolve_device(device_for_rank(device))
        init_distributed_from_env()
        start = starting_model(model, target, offline, resume)
        train_set = SA1BDataset(data, img_size=start.img_size, limit=limit)
        _check_annotated("--data", train_set)
        val_set = SA1BDataset(val, img_size=start.img_size) if val else None
        if val_set is not None:
            _check_annotated("--val", val_set)
        config = DistillConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, amp=amp,
                               seed=seed, num_workers=workers)
        trained, result = run_training(start, train_set, out, config, stage=stage, val=val_set, resume=resume,
                                       device=target, max_masks=max_masks, heatmap_weight=heatmap_weight,
                                       console=console)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.write(json.dumps({"out": str(out), "stage": stage, "final": str(result.final_path),
                                         "best": str(result.best_path), "metric": result.metric,
                                         "best_metric": result.best_metric, "best_epoch": result.best_epoch,
                                         "autoppn": getattr(trained, "autoppn", None) is not None}) + "\n")
