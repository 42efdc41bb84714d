"""The one training loop behind ``slimseg distill`` and ``slimseg train``.

It runs epochs of an objective (``compress/objectives.py``, ``compress/supervised.py``) with
Adam, gradient accumulation, ReduceLROnPlateau on a validation metric (or the training loss),
DDP under torchrun, a rich progress bar, and exact resume. Files under ``out_dir`` (written by
rank 0 only, atomically):
    ``last.ckpt``          resumable state after every epoch (``compress/training_state.py``);
    ``best.safetensors``   the model whenever the epoch metric improves (``save_model``);
    ``final.safetensors``  the model after the last epoch;
    ``metrics.jsonl``      step and epoch records (``compress/metrics.py``);
    ``loss.png``           the loss curve, redrawn after every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from slimseg.compress.distill_config import DistillConfig, DistillResult
from slimseg.compress.distributed import broadcast_float, rank_and_world
from slimseg.compress.loss_plot import draw_loss_curve
from slimseg.compress.metrics import MetricsLog, read_metrics
from slimseg.compress.progress import TrainingProgress
from slimseg.compress.train_epoch import EpochRunner
from slimseg.compress.training_state import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
    weights_fingerprint,
)
from slimseg.data.datasets import collate_images
from slimseg.errors import SlimsegError, UsageError
from slimseg.zoo.loading import save_model

__all__ = ["TrainingTask", "check_resume_epochs", "load_resume_state", "run_training"]

# Settings that must not change on resume: they decide which images meet in which step, or
# the restored state would silently override the new value (lr: the optimizer's state), or
# the rest of the run would differ from an uninterrupted one. epochs may grow; num_workers
# and log_every change nothing that is computed.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed", "lr", "amp", "intermediate_weight", "align", "val_limit")


@dataclass
class TrainingTask:
    """What one run trains and how it is judged.

    Attributes:
        kind: "distill", "masks" or "autoppn"; a run resumes only a run of its own kind.
        model: the whole model, saved as best/final.safetensors.
        objective: called on every batch (see ``compress/objectives.py``).
        trained: the module whose parameters the optimizer updates and last.ckpt stores.
        validate: the validation metric of the model (higher is better), or None to let the
            training loss drive the schedule; ``val_name`` names it in the records (val_<name>).
            It may return a dict instead: the metric under ``val_name`` plus the values named in
            ``val_extras``, logged beside it (val_<extra>) but not driving anything.
        loss_label: what the loss is, for the y axis of loss.png.
        weight_for_epoch: the ``weight`` the objective gets in each epoch (distillation: the
            intermediate weight while those terms are on).
        references: other modules the run reads but never trains (the teacher). They and the
            model's weights outside ``trained`` are not stored in last.ckpt, so their
            fingerprint is, and a resume with other ones (``frozen_name``) is refused.
    """

    kind: str
    model: nn.Module
    objective: nn.Module
    trained: nn.Module
    validate: Callable[[nn.Module], float | Mapping[str, float]] | None = None
    val_name: str = "miou"
    val_extras: tuple[str, ...] = ()
    loss_label: str = "loss"
    weight_for_epoch: Callable[[int], float | None] = lambda epoch: None
    extra_state: dict[str, Any] = field(default_factory=dict)
    title: str = "Training loss"
    references: tuple[nn.Module, ...] = ()
    frozen_name: str = "the model's frozen weights"

    @property
    def mode(self) -> str:
        return "max" if self.validate is not None else "min"

    @property
    def metric(self) -> str:
        return f"val_{self.val_name}" if self.validate is not None else "train_loss"


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


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def check_resume_epochs(out_dir: Path, done: int, epochs: int, option: str = "epochs") -> None:
    """A resume may only add epochs: fewer than the run has done would leave last.ckpt,
    metrics.jsonl and best.safetensors past the end that final.safetensors claims."""
    if epochs < done:
        raise UsageError(f"cannot resume from {out_dir} with {option} {epochs}: the run has reached epoch {done}; "
                         f"give {option} {done} or more")


def load_resume_state(out_dir: Path, kind: str, model: nn.Module, config: DistillConfig, mode: str,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``out_dir/last.ckpt``, checked to belong to a run that this one can continue.

    ``settings``: the task's own settings (stored in last.ckpt by ``TrainingTask.extra_state``)
    that must match too; one that the checkpoint does not hold is not compared.
    """
    state = load_training_state(out_dir)
    if state.get("kind", "distill") != kind:
        raise SlimsegError(f"cannot resume from {out_dir}: it holds {_a(state.get('kind', 'distill'))} run, "
                           f"not {_a(kind)} run")
    if state["model_config"] != model.config.to_json():
        raise SlimsegError(f"cannot resume from {out_dir}: last.ckpt holds a model of another architecture")
    saved = state["distill_config"]
    differing = [f"{name} was {saved.get(name)!r} there, now {getattr(config, name)!r}"
                 for name in _RESUME_FIXED if saved.get(name) != getattr(config, name)]
    differing += [f"{name} was {state[name]!r} there, now {value!r}"
                  for name, value in (settings or {}).items() if name in state and state[name] != value]
    if differing:
        raise SlimsegError(f"cannot resume from {out_dir}: settings differ from the run's ({'; '.join(differing)}); "
                           "resume with the same settings, or start a new run in another folder")
    check_resume_epochs(out_dir, int(state["epoch"]), config.epochs)
    if state["world_size"] != rank_and_world()[1]:
        raise SlimsegError(f"cannot resume from {out_dir}: it ran on {state['world_size']} process(es), "
                           f"now {rank_and_world()[1]}")
    if state["scheduler"].get("mode") != mode:
        raise SlimsegError(f"cannot resume from {out_dir}: it was run {'with' if mode == 'min' else 'without'} "
                           "a validation set")
    return state


def _improved(metric: float, best: float | None, mode: str) -> bool:
    if math.isnan(metric):
        return False
    return best is None or (metric > best if mode == "max" else metric < best)


def _redraw_plot(out_dir: Path, title: str, loss_label: str) -> None:
    records = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [(int(r["epoch"]), int(r["step"])) for r in records if r.get("kind") == "epoch"]
    draw_loss_curve(out_dir / "loss.png", [int(r["step"]) for r in steps],
                    [float("nan") if r["loss"] is None else float(r["loss"]) for r in steps], epochs,
                    title=f"{title}: {out_dir.name}", y_label=loss_label)


class _Run:
    """The mutable state of one run between epochs."""

    def __init__(self, task: TrainingTask, out_dir: Path, config: DistillConfig, device: torch.device,
                 progress: TrainingProgress, main: bool, world: int) -> None:
        self.task, self.out_dir, self.config, self.device = task, out_dir, config, device
        self.progress, self.main, self.world = progress, main, world
        self.optimizer = torch.optim.Adam([p for p in task.trained.parameters() if p.requires_grad], lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode=task.mode, factor=0.5,
                                                                    patience=3)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
        self.metrics = MetricsLog(out_dir / "metrics.jsonl")
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, None, None
        self.fingerprint = weights_fingerprint((task.model, *task.references), exclude=task.trained)

    def restore(self, state: dict[str, Any]) -> None:
        stored = state.get("frozen_fingerprint")  # absent in checkpoints of earlier versions
        if stored is not None and stored != self.fingerprint:
            raise SlimsegError(f"cannot resume from {self.out_dir}: {self.task.frozen_name} differ from the ones the "
                               "run started with (they are not in last.ckpt); give the same ones")
        self.task.trained.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.best_epoch = state["best_metric"], state["best_epoch"]
        if self.main:
            self.metrics.truncate_after(self.epoch)

    def checkpoint(self) -> None:
        save_training_state(self.out_dir / "last.ckpt", {
            "kind": self.task.kind, "weights": self.task.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "best_metric": self.best, "best_epoch": self.best_epoch, "world_size": self.world,
            "rng": capture_rng_state(), "model_config": self.task.model.config.to_json(),
            "distill_config": asdict(self.config), "frozen_fingerprint": self.fingerprint,
            **self.task.extra_state})

    def run_epoch(self, runner: EpochRunner, train: Dataset,
                  on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
        task, config, optimizer = self.task, self.config, self.optimizer
        epoch = self.epoch + 1
        loader = _loader(train, config, epoch)
        first_step = self.step
        self.progress.start_epoch(epoch, config.epochs, math.ceil(len(loader) / config.grad_accum),
                                  optimizer.param_groups[0]["lr"])
        weight = task.weight_for_epoch(epoch)
        set_epoch = getattr(task.objective, "set_epoch", None)
        if set_epoch is not None:  # objectives that draw at random do it from (seed, epoch)
            set_epoch(epoch)

        def on_log(at_step: int, loss: float, parts: dict[str, float | None], images_per_s: float) -> None:
            current_lr = optimizer.param_groups[0]["lr"]
            self.progress.update(at_step - first_step, loss, current_lr, images_per_s)
            if self.main:
                self.metrics.append({"kind": "step", "epoch": epoch, "step": at_step, "loss": loss,
                                     **{f"{name}_loss": value for name, value in parts.items()},
                                     "lr": current_lr, "images_per_s": images_per_s})

        stats, self.step = runner.run(loader, len(loader), weight, self.step, config.log_every, on_log)
        self.epoch = epoch
        val, extras = None, {}
        if task.validate is not None:
            values: Mapping[str, float] = {}
            if self.main:
                task.model.eval()
                result = task.validate(task.model)
                values = result if isinstance(result, Mapping) else {task.val_name: result}
            # every rank writes the same record keys (on_epoch_end), with rank 0's values
            val = broadcast_float(values.get(task.val_name))
            extras = {f"val_{name}": broadcast_float(values.get(name)) for name in task.val_extras}
        metric = val if task.mode == "max" else stats.loss
        self.scheduler.step(metric)
        improved = _improved(metric, self.best, task.mode)
        if improved:
            self.best, self.best_epoch = metric, epoch
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, "train_loss": stats.loss,
                  **{f"{name}_loss": value for name, value in stats.parts.items()},
                  f"val_{task.val_name}": val, **extras,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": stats.seconds, "images": stats.images,
                  "improved": improved}
        if self.main:
            if improved:
                task.model.eval()
                save_model(task.model, self.out_dir / "best.safetensors")
            self.checkpoint()
            self.metrics.append(record)
            _redraw_plot(self.out_dir, task.title, task.loss_label)
            self.progress.log(f"epoch {epoch}/{config.epochs}: loss {stats.loss:.6g}"
                              + ("" if val is None else f", {task.metric} {val:.4f}")
                              + "".join(f", {name} {_number(value)}" for name, value in extras.items())
                              + f", lr {record['lr']:.2e}, {stats.seconds:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(record)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def run_training(task: TrainingTask, train: Dataset, out_dir: Path, config: DistillConfig, device: torch.device,
                 state: dict[str, Any] | None, progress: TrainingProgress,
                 on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> DistillResult:
    """Train ``task`` for the epochs that ``state`` (a checked last.ckpt, or None) has not done.

    The model must already be on ``device``; in the process group (if any) of torchrun. On
    return the model holds the final weights, in eval mode.
    """
    rank, world = rank_and_world()
    main = rank == 0
    run = _Run(task, out_dir, config, device, progress, main, world)
    if state is not None:
        run.restore(state)
    elif main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run must not append to an old log
    objective: nn.Module = task.objective
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    runner = EpochRunner(objective, task.objective.part_names, run.optimizer, run.scaler, device, config.amp,
                         config.grad_accum)
    if state is not None:
        # Last, so that nothing above (a dry forward included) can shift the restored streams.
        restore_rng_state(state["rng"])
    finished = state is not None and run.epoch >= config.epochs
    if finished and main:
        # Resuming a finished run (a job script that always passes --resume) does nothing: its
        # files stay as they are; final.safetensors is written only if the run stopped before it.
        progress.log(f"{out_dir}: the run has already done its {run.epoch} epoch(s); nothing to train")
    with progress:
        while run.epoch < config.epochs:
            run.run_epoch(runner, train, on_epoch_end)
    task.model.eval()
    if main and not (finished and (out_dir / "final.safetensors").is_file()):
        save_model(task.model, out_dir / "final.safetensors")
    epochs = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    return DistillResult(out_dir, epochs, task.metric, run.best, run.best_epoch)
