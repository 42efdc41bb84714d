"""SlimSAM's aligning distillation of a student image encoder towards a teacher's.

``distill`` trains only ``student.image_encoder`` with the final-embedding MSE, plus, in the
first epochs, the intermediate "bottleneck aligning" terms (see ``compress/losses.py``).
Optimizer and schedule follow SlimSAM: Adam (lr 1e-4), gradient accumulation,
ReduceLROnPlateau(factor 0.5, patience 3) on the validation point-prompt mIoU.

Files under ``out_dir`` (written by rank 0 only, atomically):
    ``last.ckpt``          resumable state after every epoch (``compress/training_state.py``);
    ``best.safetensors``   the student whenever the epoch metric improves (``save_model``);
    ``final.safetensors``  the student after the last epoch;
    ``metrics.jsonl``      step and epoch records (``compress/metrics.py``);
    ``loss.png``           the loss curve, redrawn after every epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from slimseg.compress.distill_config import DistillConfig, DistillResult
from slimseg.compress.distributed import broadcast_float, init_distributed_from_env, is_distributed, rank_and_world
from slimseg.compress.loss_plot import draw_loss_curve
from slimseg.compress.losses import FeatureTaps, match_features
from slimseg.compress.metrics import MetricsLog, read_metrics
from slimseg.compress.progress import TrainingProgress
from slimseg.compress.train_epoch import EpochRunner
from slimseg.compress.training_state import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from slimseg.data.datasets import collate_images
from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import Sam
from slimseg.zoo.loading import save_model

__all__ = ["DistillConfig", "DistillResult", "distill", "init_distributed_from_env"]

# Settings that must not change on resume: they decide which images meet in which step.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed")


def _loader(train: Dataset, config: DistillConfig, epoch: int) -> DataLoader:
    """This epoch's batches; the order depends only on (seed, epoch), so a resumed run repeats it."""
    rank, world = rank_and_world()
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_images)
    if world > 1:
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        return DataLoader(train, sampler=sampler, **common)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    return DataLoader(train, shuffle=True, generator=generator, **common)


def _first_images(train: Dataset, device: torch.device) -> torch.Tensor:
    """(1, 3, S, S): the first readable training image, for the dry forward that matches features."""
    for index in range(len(train)):
        item = train[index]
        if item is not None:
            return item["image"][None].to(device)
    raise SlimsegError("distill: no readable image in the training set")


def _check_resume(state: dict[str, Any], student: Sam, config: DistillConfig, mode: str, out_dir: Path) -> None:
    if state["model_config"] != student.config.to_json():
        raise SlimsegError(f"cannot resume from {out_dir}: last.ckpt holds a student of another architecture")
    saved = state["distill_config"]
    for name in _RESUME_FIXED:
        if saved.get(name) != getattr(config, name):
            raise SlimsegError(
                f"cannot resume from {out_dir}: {name} was {saved.get(name)} there, now {getattr(config, name)}"
            )
    if state["world_size"] != rank_and_world()[1]:
        raise SlimsegError(f"cannot resume from {out_dir}: it ran on {state['world_size']} process(es), "
                           f"now {rank_and_world()[1]}")
    if state["scheduler"].get("mode") != mode:
        raise SlimsegError(f"cannot resume from {out_dir}: it was run {'with' if mode == 'min' else 'without'} "
                           "a validation set")


def _improved(metric: float, best: float | None, mode: str) -> bool:
    if math.isnan(metric):
        return False
    return best is None or (metric > best if mode == "max" else metric < best)


def _redraw_plot(out_dir: Path) -> None:
    records = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [(int(r["epoch"]), int(r["step"])) for r in records if r.get("kind") == "epoch"]
    draw_loss_curve(out_dir / "loss.png", [int(r["step"]) for r in steps],
                    [float("nan") if r["loss"] is None else float(r["loss"]) for r in steps], epochs,
                    title=f"Distillation loss: {out_dir.name}")


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

    Under torchrun (``WORLD_SIZE`` > 1) the process group is started here if needed (and
    destroyed again at the end); the encoder is wrapped in DistributedDataParallel.
    """
    config.validate()
    out_dir = Path(out_dir)
    was_distributed = is_distributed()
    rank, world = init_distributed_from_env()
    owns_group = not was_distributed and is_distributed()
    try:
        return _distill(student, teacher, train, out_dir, config, val, resume, resolve_device(device),
                        on_epoch_end, console, rank, world)
    finally:
        if owns_group and is_distributed():
            dist.destroy_process_group()


def _distill(student: Sam, teacher: Sam, train: Dataset, out_dir: Path, config: DistillConfig,
             val: Dataset | None, resume: bool, device: torch.device,
             on_epoch_end: Callable[[dict[str, Any]], None] | None, console: Console | None,
             rank: int, world: int) -> DistillResult:
    main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    encoder, teacher_encoder = student.image_encoder, teacher.image_encoder
    student.to(device)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    encoder.requires_grad_(True)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.lr)
    mode = "max" if val is not None else "min"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=3)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    metrics = MetricsLog(out_dir / "metrics.jsonl")

    done_epochs, step, best, best_epoch = 0, 0, None, None
    intermediate_epochs = config.intermediate_epochs
    state = None
    if resume:
        state = load_training_state(out_dir)
        _check_resume(state, student, config, mode, out_dir)
        encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        done_epochs, step = int(state["epoch"]), int(state["step"])
        best, best_epoch = state["best_metric"], state["best_epoch"]
        if intermediate_epochs is None:  # keep the schedule the run started with
            intermediate_epochs = int(state["intermediate_epochs"])
        if main:
            metrics.truncate_after(done_epochs)
    elif main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run must not append to an old log
    if intermediate_epochs is None:
        intermediate_epochs = config.epochs // 2
    weight = config.intermediate_weight

    progress = TrainingProgress(console, enabled=main)
    pairs = []
    if weight > 0 and done_epochs < min(intermediate_epochs, config.epochs):
        pairs = match_features(encoder, teacher_encoder, _first_images(train, device), config.align)
        if main:
            names = ", ".join(pair.name for pair in pairs) or "none match, embedding loss only"
            progress.log(f"distill: intermediate terms for epochs 1-{intermediate_epochs}: {names}")
    student_taps = FeatureTaps(encoder, [p.name for p in pairs]) if pairs else None
    teacher_taps = FeatureTaps(teacher_encoder, [p.name for p in pairs]) if pairs else None

    model = encoder
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    runner = EpochRunner(model, teacher_encoder, optimizer, scaler, device, config.amp, config.grad_accum,
                         pairs, student_taps, teacher_taps)
    if state is not None:
        # Last, so that nothing above (the dry forward included) can shift the restored streams.
        restore_rng_state(state["rng"])

    try:
        with progress:
            for epoch in range(done_epochs + 1, config.epochs + 1):
                step, best, best_epoch = _run_epoch(
                    epoch, student, train, val, out_dir, config, runner, optimizer, scheduler, scaler,
                    metrics, progress, step, best, best_epoch, mode, intermediate_epochs, main, world,
                    on_epoch_end, bool(pairs))
    finally:
        for taps in (student_taps, teacher_taps):
            if taps is not None:
                taps.remove()
    student.eval()
    if main:
        save_model(student, out_dir / "final.safetensors")
    epochs = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    return DistillResult(out_dir, epochs, "val_miou" if mode == "max" else "train_loss", best, best_epoch,
                         [p.name for p in pairs], intermediate_epochs)


def _run_epoch(epoch: int, student: Sam, train: Dataset, val: Dataset | None, out_dir: Path,
               config: DistillConfig, runner: EpochRunner, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, scaler: torch.amp.GradScaler,
               metrics: MetricsLog, progress: TrainingProgress, step: int, best: float | None,
               best_epoch: int | None, mode: str, intermediate_epochs: int, main: bool, world: int,
               on_epoch_end: Callable[[dict[str, Any]], None] | None, has_pairs: bool,
               ) -> tuple[int, float | None, int | None]:
    """Train one epoch, validate, step the schedule and write every file; returns (step, best, best_epoch)."""
    loader = _loader(train, config, epoch)
    total_steps = math.ceil(len(loader) / config.grad_accum)
    first_step = step
    lr = optimizer.param_groups[0]["lr"]
    progress.start_epoch(epoch, config.epochs, total_steps, lr)
    weight = config.intermediate_weight if has_pairs and epoch <= intermediate_epochs else None

    def on_log(at_step: int, means: tuple[float, float, float, float], images_per_s: float) -> None:
        current_lr = optimizer.param_groups[0]["lr"]
        progress.update(at_step - first_step, means[0], current_lr, images_per_s)
        if main:
            metrics.append({"kind": "step", "epoch": epoch, "step": at_step, "loss": means[0],
                            "embedding_loss": means[1],
                            "intermediate_loss": None if weight is None else means[2],
                            "lr": current_lr, "images_per_s": images_per_s})

    stats, step = runner.run(loader, len(loader), weight, step, config.log_every, on_log)
    val_miou = None
    if val is not None:
        if main:
            from slimseg.evaluation.point_miou import point_prompt_miou
            from slimseg.inference.predictor import Predictor

            student.eval()
            val_miou = point_prompt_miou(Predictor(student), val, limit=config.val_limit)
        val_miou = broadcast_float(val_miou)
    metric = val_miou if mode == "max" else stats.loss
    scheduler.step(metric)
    improved = _improved(metric, best, mode)
    if improved:
        best, best_epoch = metric, epoch
    record = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": stats.loss,
              "embedding_loss": stats.embedding_loss, "intermediate_loss": stats.intermediate_loss,
              "val_miou": val_miou, "lr": optimizer.param_groups[0]["lr"], "seconds": stats.seconds,
              "images": stats.images, "improved": improved}
    if main:
        if improved:
            student.eval()
            save_model(student, out_dir / "best.safetensors")
        save_training_state(out_dir / "last.ckpt", {
            "encoder": student.image_encoder.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "step": step, "best_metric": best, "best_epoch": best_epoch,
            "intermediate_epochs": intermediate_epochs, "world_size": world, "rng": capture_rng_state(),
            "model_config": student.config.to_json(), "distill_config": asdict(config)})
        metrics.append(record)
        _redraw_plot(out_dir)
        progress.log(f"epoch {epoch}/{config.epochs}: loss {stats.loss:.6g}"
                     + ("" if val_miou is None else f", val mIoU {val_miou:.4f}")
                     + f", lr {record['lr']:.2e}, {stats.seconds:.1f}s")
    if on_epoch_end is not None:
        on_epoch_end(record)
    return step, best, best_epoch
