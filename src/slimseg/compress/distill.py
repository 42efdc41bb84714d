"""SlimSAM's aligning distillation of a student image encoder towards a teacher's.

``distill`` trains only ``student.image_encoder`` with the final-embedding MSE, plus, in the
first epochs, the intermediate "bottleneck aligning" terms (see ``compress/losses.py``).
Optimizer and schedule follow SlimSAM: Adam (lr 1e-4), gradient accumulation,
ReduceLROnPlateau(factor 0.5, patience 3) on the validation point-prompt mIoU. The loop,
its files and resume are ``compress/training_loop.py``'s.

A student with another input size than the teacher's (Lite-SAM at 640 px from SAM at 1024 px)
is distilled on the teacher's embedding resized to the student's grid; the dataset then
gives each image at both sizes (``ImageFolderDataset(teacher_img_size=...)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import Dataset

from slimseg.compress.checks import check_annotated, check_image_size, check_run_folder, first_item
from slimseg.compress.distill_config import DistillConfig, DistillResult
from slimseg.compress.distributed import init_distributed_from_env, process_group
from slimseg.compress.losses import FeatureTaps, match_features
from slimseg.compress.objectives import EmbeddingDistillation
from slimseg.compress.progress import TrainingProgress
from slimseg.compress.training_loop import TrainingTask, load_resume_state, run_training
from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import Sam

__all__ = ["DistillConfig", "DistillResult", "distill", "init_distributed_from_env", "point_miou_validator"]


def check_distill_data(student: Sam, teacher: Sam, train: Dataset, val: Dataset | None,
                       val_limit: int | None, names: tuple[str, str] = ("distill: train", "distill: val")
                       ) -> dict[str, Any]:
    """Refuse, before any epoch, data that the run could not use: an empty or unreadable
    training set, images at another size than the student's (or, for a teacher of another
    size, without its copy at the teacher's size), a validation set without annotated
    objects. ``names`` name the two sets in messages (a prune run checks them too).
    Returns the first readable training item (for the dry forward)."""
    train_name, val_name = names
    item = first_item(train, train_name)
    check_image_size(item, train_name, student.img_size, model="the student")
    if "teacher_image" in item or teacher.img_size != student.img_size:
        if "teacher_image" not in item:
            raise SlimsegError(f"{train_name}: the teacher takes {teacher.img_size} px and the student "
                               f"{student.img_size} px, but the dataset gives no teacher_image; build it with "
                               f"teacher_img_size={teacher.img_size}")
        check_image_size(item, train_name, teacher.img_size, "teacher_image", "teacher_img_size",
                         model="the teacher")
    if val is not None:
        check_annotated(val, val_name, val_limit)
    return item


def point_miou_validator(val: Dataset, limit: int | None) -> Callable[[torch.nn.Module], float]:
    """The point-prompt mIoU of a model on an ``SA1BDataset`` (validation metric)."""
    from slimseg.evaluation.point_miou import point_prompt_miou
    from slimseg.inference.predictor import Predictor

    return lambda model: point_prompt_miou(Predictor(model), val, limit=limit)


def distill(
    student: Sam,
    teacher: Sam,
    train: Dataset,
    out_dir: str | Path,
    config: DistillConfig,
    val: Dataset | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    console: Console | None = None,
    overwrite: bool = False,
) -> DistillResult:
    """Distil ``teacher.image_encoder`` into ``student.image_encoder`` (trained in place).

    The teacher is moved to ``device``, put in eval mode and has its gradients turned off;
    the student's prompt encoder and mask decoder are left as they are. On return the
    student holds the final weights, in eval mode.

    Args:
        train: items with ``"image"`` (3, S, S) preprocessed as ``Sam.preprocess`` does, or
            None for unreadable files (e.g. ``ImageFolderDataset``); all-None batches are skipped.
        val: an ``SA1BDataset``; its point-prompt mIoU drives the LR schedule and ``best``.
            Without it the mean training loss does.
        resume: continue from ``out_dir/last.ckpt``; the remaining epochs then give exactly
            the losses of an uninterrupted run (same device, world size and settings).
        device: with DDP on CUDA, each rank uses ``cuda:LOCAL_RANK`` instead.
        on_epoch_end: called on every rank with each epoch record after its files are written.
        console: where the progress bars go (rank 0, terminals only); stderr by default.
        overwrite: start afresh in an ``out_dir`` that holds a run or other files; without it
            (and without ``resume``) such a folder is refused, as ``slimseg distill`` does.

    Under torchrun (``WORLD_SIZE`` > 1) the process group is started here if needed (and
    destroyed again at the end); the objective (student encoder and teacher) is wrapped in
    DistributedDataParallel, which syncs the gradients of the student encoder.
    """
    config.validate()
    out_dir = Path(out_dir)
    check_run_folder(out_dir, resume or overwrite)
    first = check_distill_data(student, teacher, train, val, config.val_limit)
    with process_group() as (rank, world):
        return _distill(student, teacher, train, first, out_dir, config, val, resume, resolve_device(device),
                        on_epoch_end, console, rank, world)


def _distill(student: Sam, teacher: Sam, train: Dataset, first: dict[str, Any], out_dir: Path,
             config: DistillConfig, val: Dataset | None, resume: bool, device: torch.device,
             on_epoch_end: Callable[[dict[str, Any]], None] | None, console: Console | None,
             rank: int, world: int) -> DistillResult:
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    encoder, teacher_encoder = student.image_encoder, teacher.image_encoder
    student.to(device).requires_grad_(False)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    encoder.requires_grad_(True)
    mode = "max" if val is not None else "min"
    # An explicit intermediate_epochs must match the stored schedule; None keeps it.
    settings = {} if config.intermediate_epochs is None else {"intermediate_epochs": config.intermediate_epochs}
    state = load_resume_state(out_dir, "distill", student, config, mode, settings) if resume else None
    intermediate_epochs = config.intermediate_epochs
    if intermediate_epochs is None and state is not None:  # keep the schedule the run started with
        intermediate_epochs = int(state["intermediate_epochs"])
    if intermediate_epochs is None:
        intermediate_epochs = config.epochs // 2
    done_epochs = int(state["epoch"]) if state is not None else 0

    progress = TrainingProgress(console, enabled=rank == 0)
    pairs = []
    same_input = student.img_size == teacher.img_size
    if config.intermediate_weight > 0 and done_epochs < min(intermediate_epochs, config.epochs):
        if same_input:
            pairs = match_features(encoder, teacher_encoder, first["image"][None].to(device), config.align)
        if rank == 0:
            names = ", ".join(pair.name for pair in pairs) or (
                "none match, embedding loss only" if same_input else
                f"none (input sizes differ: {student.img_size} vs {teacher.img_size}), embedding loss only")
            progress.log(f"distill: intermediate terms for epochs 1-{intermediate_epochs}: {names}")
    names = [p.name for p in pairs]
    student_taps = FeatureTaps(encoder, names) if pairs else None
    teacher_taps = FeatureTaps(teacher_encoder, names) if pairs else None
    weight = config.intermediate_weight
    task = TrainingTask(
        kind="distill", model=student, trained=encoder,
        objective=EmbeddingDistillation(encoder, teacher_encoder, pairs, student_taps, teacher_taps,
                                        teacher_key="teacher_image" if "teacher_image" in first else "image",
                                        student_img_size=student.img_size, teacher_img_size=teacher.img_size),
        validate=point_miou_validator(val, config.val_limit) if val is not None else None,
        weight_for_epoch=lambda epoch: weight if pairs and epoch <= intermediate_epochs else None,
        extra_state={"intermediate_epochs": intermediate_epochs}, title="Distillation loss",
        loss_label="loss (MSE)",
        references=(teacher,), frozen_name="the teacher's weights or the student's outside its image encoder")
    try:
        result = run_training(task, train, out_dir, config, device, state, progress, on_epoch_end)
    finally:
        for taps in (student_taps, teacher_taps):
            if taps is not None:
                taps.remove()
    result.intermediate_terms, result.intermediate_epochs = names, intermediate_epochs
    return result
