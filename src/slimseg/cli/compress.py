"""``slimseg prune`` and ``slimseg distill``: SlimSAM compression from the shell."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from slimseg.cli.common import DeviceOption, ModelOption, OfflineOption, check_output_path, console, user_errors
from slimseg.compress.checks import check_run_folder as check_fresh_run_folder
from slimseg.errors import SlimsegError, UsageError
from slimseg.modeling.sam import Sam
from slimseg.zoo import load_model, save_model
from slimseg.zoo.info import complexity

DataOption = Annotated[Path, typer.Option("--data", metavar="DIR", help="Training images: a folder of images or an SA-1B folder (sa_*.jpg + sa_*.json); no labels are needed.", show_default=False)]
ValOption = Annotated[Optional[Path], typer.Option("--val", metavar="DIR", help="SA-1B folder for validation point-prompt mIoU (drives the learning-rate schedule and best.safetensors); without it the training loss does.", show_default=False)]
EpochsHelp = "Distillation epochs"
BatchOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per step and process.")]
AccumOption = Annotated[int, typer.Option("--grad-accum", min=1, help="Steps whose gradients add up before each optimizer update.")]
LrOption = Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.")]
AmpOption = Annotated[bool, typer.Option("--amp", help="Mixed precision: bfloat16 autocast on CPU, float16 with loss scaling on CUDA.")]
WorkersOption = Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N training images.", show_default=False)]


def device_for_rank(device: str) -> str:
    """Under torchrun each process takes its own GPU."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def starting_model(name_or_path: str, device: torch.device, offline: bool, resume: bool = False):
    """A checkpoint, a registered model's weights, or - for a registered architecture without
    published weights (lite-sam) - a random initialisation, said on stderr unless ``resume``
    is about to replace it with last.ckpt's weights."""
    from slimseg.zoo import build_model
    from slimseg.zoo.registry import get_spec, is_model_name

    if is_model_name(name_or_path) and get_spec(name_or_path).weights is None and not Path(name_or_path).exists():
        if not resume:
            console.print(f"slimseg: {name_or_path} has no published weights: starting from random initialisation")
        return build_model(name_or_path, device=device)
    return load_model(name_or_path, device=device, offline=offline)


def check_run_folder(out: Path, resume: bool) -> None:
    """``--out`` must be a writable folder, and a fresh run must not overwrite a finished one
    nor write into a folder of other files (the library's check, under the options' names)."""
    check_output_path(out, folder=True)
    check_fresh_run_folder(out, resume, "--out", "--resume")


def check_input_folders(**folders: Path | None) -> None:
    """``--data`` and ``--val`` must be existing folders: said before any model is read (a
    download of SAM-B takes minutes), as output paths are. Keyword names are option names
    (``val`` → ``--val``); None (an option not given) passes."""
    for name, folder in folders.items():
        if folder is None:
            continue
        if not folder.exists():
            raise SlimsegError(f"--{name} {folder}: no such folder")
        if not folder.is_dir():
            raise SlimsegError(f"--{name} {folder}: is a file, not a folder")


def check_resume_before_loading(out: Path, epochs: int) -> None:
    """With --resume, a last.ckpt that cannot be read, or a run that has done more than
    ``--epochs`` epochs, is refused before any model is read. The tensors are memory-mapped,
    not read; the library checks the rest once the models are there."""
    from slimseg.compress.training_loop import check_resume_epochs as check_epochs
    from slimseg.compress.training_state import load_training_state

    state = load_training_state(out, mmap=True)
    done = state.get("epoch")
    if isinstance(done, int):
        check_epochs(out, done, epochs, "--epochs")


def _summary(label: str, model: Sam) -> dict:
    report = complexity(model.config)
    return {"model": label, "parameters": report["parameters"], "macs": report["macs"]}


def _print_summaries(before: dict, after: dict) -> None:
    table = Table("", "encoder params", "total params", "encoder MACs (layers)", "encoder MACs (attention)")
    for row in (before, after):
        p, m = row["parameters"], row["macs"]["image_encoder"]
        table.add_row(row["model"], f"{p['image_encoder'] / 1e6:.2f} M", f"{p['total'] / 1e6:.2f} M",
                      f"{m['layers'] / 1e9:.2f} G", f"{m['attention'] / 1e9:.2f} G")
    console.print(table)


def _datasets(data: Path, val: Path | None, img_size: int, limit: int | None, teacher_img_size: int | None = None):
    from slimseg.data.datasets import ImageFolderDataset, SA1BDataset

    train = ImageFolderDataset(data, img_size=img_size, limit=limit, teacher_img_size=teacher_img_size)
    return train, (SA1BDataset(val, img_size=img_size) if val else None)


def prune(
    model: ModelOption = "sam-b",
    ratio: Annotated[float, typer.Option("--ratio", min=0.0, max=0.99, help="Fraction of channels removed in each pruned sub-structure: 0.5 → SlimSAM-50, 0.77 → SlimSAM-77.", show_default=False)] = ...,
    data: DataOption = ...,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Pruned model, slimseg safetensors (.safetensors). Distillation runs go to FILE's folder under <name>.work/.", show_default=False)] = ...,
    val: ValOption = None,
    mode: Annotated[str, typer.Option("--mode", metavar="local|global", help="local: the same ratio in every block (uniform widths); global: blocks ranked together (widths differ per block).")] = "local",
    stage: Annotated[str, typer.Option("--stage", metavar="embedding|bottleneck|both", help="embedding, bottleneck, or both (SlimSAM's alternate slimming).")] = "both",
    importance: Annotated[str, typer.Option("--importance", metavar="disturbed-taylor|magnitude|random", help="disturbed-taylor, magnitude or random (taylor, without the noise, has a zero gradient in every step of this pipeline and is refused).")] = "disturbed-taylor",
    grad_images: Annotated[int, typer.Option("--grad-images", min=1, help="Images whose gradients rank the channels (Taylor criteria).")] = 1000,
    distill_epochs: Annotated[int, typer.Option("--distill-epochs", min=0, help="Distillation epochs after each pruning step; 0 prunes only.")] = 20,
    batch_size: BatchOption = 1,
    grad_accum: AccumOption = 4,
    lr: LrOption = 1e-4,
    amp: AmpOption = False,
    limit: LimitOption = None,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
) -> None:
    """Prune a SAM image encoder the SlimSAM way and save the exact pruned architecture."""
    from slimseg.compress.distill import DistillConfig
    from slimseg.compress.slimming import (
        SLIMMING_IMPORTANCES,
        STAGE_CHOICES,
        SlimmingPlan,
        alternate_slimming,
        check_prunable,
    )
    from slimseg.devices import resolve_device

    with user_errors():
        if out.suffix != ".safetensors":
            raise UsageError(f"--out {out}: the file name must end in .safetensors")
        if importance == "taylor":
            # each step's reference is the model it prunes, so the noiseless gradient is zero
            raise UsageError("--importance taylor needs a student that differs from its teacher, and each pruning "
                             "step starts from a copy of it: use --importance disturbed-taylor (the default), "
                             "magnitude or random")
        for name, value, choices in (("--mode", mode, ("local", "global")), ("--stage", stage, STAGE_CHOICES),
                                     ("--importance", importance, SLIMMING_IMPORTANCES)):
            if value not in choices:
                raise UsageError(f"{name} {value!r}: choose one of {', '.join(choices)}")
        check_output_path(out, folder=False)
        work = out.parent / f"{out.stem}.work"
        if work.exists() and not work.is_dir():
            raise UsageError(f"--out {out} needs the work folder {work} for its distillation runs, but that is "
                             "a file: move it away or choose another --out")
        check_output_path(work, "--out", folder=True)
        check_input_folders(data=data, val=val)
        target = resolve_device(device_for_rank(device))
        teacher = load_model(model, device=target, offline=offline)
        check_prunable(teacher, f"--model {model}")
        plan = SlimmingPlan(ratio=ratio, stage=stage, mode=mode, importance=importance, grad_images=grad_images,
                            distill_epochs=distill_epochs,
                            distill=DistillConfig(batch_size=batch_size, grad_accum=grad_accum, lr=lr, amp=amp,
                                                  num_workers=workers))
        plan.check(teacher)  # an unreachable --ratio, before the data is listed
        train, val_set = _datasets(data, val, teacher.img_size, limit)
        before = _summary(str(model), teacher)
        result = alternate_slimming(teacher, train, plan, work, target, val=val_set,
                                    console=console, on_step=lambda message: console.print(f"slimseg prune: {message}"))
        save_model(result.model.cpu(), out)
        after = _summary(str(out), result.model)
        _print_summaries(before, after)
        widths = [{"qk_dim": b.qk_dim, "v_dim": b.v_dim, "mlp_dim": b.mlp_dim}
                  for b in result.model.config.image_encoder.blocks]
        sys.stdout.write(json.dumps({"out": str(out), "embed_dim": result.model.config.image_encoder.embed_dim,
                                     "blocks": widths, "before": before, "after": after}) + "\n")


def distill(
    student: Annotated[str, typer.Option("--student", metavar="NAME|PATH", help="Student checkpoint (e.g. from slimseg prune) in any supported format, or lite-sam to start a Lite-SAM from random initialisation.", show_default=False)] = ...,
    teacher: Annotated[str, typer.Option("--teacher", metavar="NAME|PATH", help="Teacher model name or checkpoint.")] = "sam-b",
    data: DataOption = ...,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Run folder: last.ckpt (resumable), best.safetensors, final.safetensors, metrics.jsonl, loss.png.", show_default=False)] = ...,
    val: ValOption = None,
    align: Annotated[str, typer.Option("--align", metavar="auto|bottleneck|embedding", help="Intermediate features aligned in the first half of the epochs: bottleneck (q/k/v and MLP outputs), embedding (block outputs) or auto (whatever matches the teacher's shapes).")] = "auto",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help=EpochsHelp + ".")] = 20,
    batch_size: BatchOption = 1,
    grad_accum: AccumOption = 4,
    lr: LrOption = 1e-4,
    amp: AmpOption = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.ckpt (model, optimizer, schedule, epoch, random state).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shuffling and noise.")] = 0,
    limit: LimitOption = None,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
) -> None:
    """Distil a (pruned) student image encoder towards a teacher's image embeddings.

    A student with another input size (lite-sam at 640 px from sam-b at 1024 px) learns the
    teacher's embedding resized to its own grid.

    Runs on many GPUs or machines unchanged under `torchrun --nproc_per_node N`.
    """
    from slimseg.compress.distill import DistillConfig, distill as run_distillation
    from slimseg.compress.losses import ALIGN_CHOICES
    from slimseg.compress.distributed import init_distributed_from_env
    from slimseg.devices import resolve_device

    with user_errors():
        if align not in ALIGN_CHOICES:
            raise UsageError(f"--align {align!r}: choose one of {', '.join(ALIGN_CHOICES)}")
        check_run_folder(out, resume)
        check_input_folders(data=data, val=val)
        if resume:
            check_resume_before_loading(out, epochs)
        target = resolve_device(device_for_rank(device))
        init_distributed_from_env()
        student_model = starting_model(student, target, offline, resume)
        teacher_model = load_model(teacher, device=target, offline=offline)
        train, val_set = _datasets(data, val, student_model.img_size, limit, teacher_img_size=teacher_model.img_size)
        config = DistillConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, amp=amp,
                               align=align, seed=seed, num_workers=workers)
        result = run_distillation(student_model, teacher_model, train, out, config, val=val_set, resume=resume,
                                  device=target, console=console)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.write(json.dumps({"out": str(out), "final": str(result.final_path),
                                         "best": str(result.best_path), "metric": result.metric,
                                         "best_metric": result.best_metric, "best_epoch": result.best_epoch}) + "\n")
