"""``slimseg eval-coco``: the papers' zero-shot COCO numbers in one command.

Reads the COCO layout, predicts per image (sharded under torchrun, resumable), scores with
the evaluation library, then prints a table on stderr and the report as a JSON line on
stdout, and writes it to ``--out`` if given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from slimseg.cli.common import (
    DeviceOption,
    ModelOption,
    OfflineOption,
    check_generator_numbers,
    check_output_path,
    console,
    model_input_files,
    user_errors,
)
from slimseg.errors import UsageError
from slimseg.inference.everything.options import MAX_POINTS_PER_SIDE
from slimseg.io import atomic_write_text, refuse_overwriting_inputs


class Prompt(str, Enum):
    box = "box"
    point = "point"
    everything = "everything"
    detections = "detections"


def _refuse_out_over_inputs(out: Path, inputs: list[Path]) -> None:
    """``--out`` and its results folder ``<stem>.images`` must not be, or hold, a file that
    the command reads: the report's atomic write, or --restart, would destroy it."""
    refuse_overwriting_inputs(out, inputs, "--out")
    folder = out.with_suffix(".images")
    if not folder.exists():
        return
    for path in inputs:
        if path.exists() and (folder.resolve() == path.resolve() or folder.resolve() in path.resolve().parents):
            raise UsageError(f"--out {out}: its results folder {folder} is or holds {path}, a file that this "
                             "command reads: write the output elsewhere")


def _file_identity(path: Path) -> dict | None:
    """Size and modification time of a checkpoint file or folder: a changed model must not
    resume the results of the old one."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]
    return {"bytes": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(split, prompt: Prompt, model: str, detections: Optional[Path], everything: dict) -> dict:
    """Everything that changes the per-image results; a stored run resumes only if they match."""
    settings = {"coco_root": str(split.root.resolve()), "split": split.split,
                "annotation_file": _file_identity(split.annotation_file), "prompt": prompt.value,
                "model": model, "model_file": _file_identity(Path(model))}
    if prompt is Prompt.everything:
        settings["segevery"] = everything
    if detections is not None:
        settings["detections"] = {"path": str(detections.resolve()), "sha256": _sha256(detections)}
    return settings


@contextlib.contextmanager
def _results_folder(out: Optional[Path], world: int) -> Iterator[Path]:
    """``<out stem>.images`` beside the report; without ``--out`` a temporary folder (no resume)."""
    if out is not None:
        folder = out.with_suffix(".images")
        existed = folder.exists()
        try:
            yield folder
        except BaseException:
            # a run that failed before finishing any image leaves nothing behind; finished
            # images stay for the rerun to resume
            if not existed and folder.is_dir() and not _has_results(folder):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return
    if world > 1:
        raise UsageError("under torchrun give --out FILE: the processes share per-image results beside it")
    with tempfile.TemporaryDirectory(prefix="slimseg-eval-coco-") as folder:
        yield Path(folder) / "images"


def _has_results(folder: Path) -> bool:
    return any(part.stat().st_size > 0 for part in folder.glob("part-*.jsonl"))


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Destroy the torchrun process group this command starts, however it ends."""
    import torch.distributed as dist

    from slimseg.compress.distributed import is_distributed

    was_distributed = is_distributed()
    try:
        yield
    finally:
        if not was_distributed and is_distributed():
            dist.destroy_process_group()


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metric]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal))


def _table(report: dict) -> Table:
    metrics, prompt = report["metrics"], report["prompt"]
    title = f"{report['model']} on COCO {report['split']}, {prompt} prompts, {report['images']} images"
    if prompt in ("box", "point"):
        table = Table("area", "mIoU", "instances", title=title)
        for key, value in metrics["miou"].items():
            table.add_row(key, "-" if value is None else f"{value:.2f}", str(metrics["instances"][key]))
    else:
        table = Table("metric", "value", title=title)
        for key, value in metrics.items():
            if key.startswith(("AR", "AP")):
                table.add_row(key, f"{value:.4f}")
        table.add_row("masks per image", f"{metrics['masks_per_image']:.1f}")
    table.add_row("seconds per image", f"{metrics['seconds_per_image']:.3f}", *([""] if prompt in ("box", "point") else []))
    return table


def eval_coco(
    coco_root: Annotated[Path, typer.Option("--coco-root", metavar="DIR", help="COCO folder: DIR/<split>/*.jpg and DIR/annotations/instances_<split>.json.", show_default=False)] = ...,
    split: Annotated[str, typer.Option("--split", metavar="SPLIT", help="Split name: image folder and annotation file suffix.")] = "val2017",
    model: ModelOption = "sam-b",
    prompt: Annotated[Prompt, typer.Option("--prompt", help="box / point: one ground-truth box / interior point per instance, mIoU by area; everything: SegEvery masks, class-agnostic AR@10/100/1000; detections: boxes from --detections, mask AP.", show_default=False)] = ...,
    detections: Annotated[Optional[Path], typer.Option("--detections", metavar="FILE", help="COCO detection results JSON (e.g. ViTDet's), for --prompt detections.", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", metavar="N", help="Evaluate only the first N images of the annotation file.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="Report JSON (written atomically); per-image results are kept in FILE's stem + .images/ so that a rerun resumes.", show_default=False)] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard the per-image results of an earlier run instead of resuming it.")] = False,
    sampler: Annotated[str, typer.Option("--sampler", metavar="grid|autoppn", help="everything: grid (SAM's point grid) or autoppn (lite-sam's proposals).")] = "grid",
    points_per_side: Annotated[int, typer.Option("--points-per-side", min=1, max=MAX_POINTS_PER_SIDE, help=f"everything, grid sampler: points per image side, at most {MAX_POINTS_PER_SIDE}.")] = 32,
    points_per_batch: Annotated[int, typer.Option("--points-per-batch", min=1, help="Prompts (points or boxes) decoded together; memory only.")] = 64,
    pred_iou_thresh: Annotated[float, typer.Option("--pred-iou-thresh", help="everything: keep masks whose predicted IoU is above this.")] = 0.88,
    stability_score_thresh: Annotated[float, typer.Option("--stability-score-thresh", help="everything: keep masks whose stability score is at least this.")] = 0.95,
    box_nms_thresh: Annotated[float, typer.Option("--box-nms-thresh", help="everything: box IoU above which duplicate masks are suppressed.")] = 0.7,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
) -> None:
    """Zero-shot COCO evaluation as in the SAM / SlimSAM / Lite-SAM papers; report on stdout.

    Runs sharded under `torchrun --nproc_per_node N` (give --out); an interrupted run resumes
    from the per-image results beside --out.
    """
    from slimseg.compress.distributed import init_distributed_from_env
    from slimseg.inference.everything.options import SAMPLERS

    with user_errors(), _process_group():
        if prompt is Prompt.detections and detections is None:
            raise UsageError("--prompt detections needs --detections FILE (COCO detection results JSON)")
        if prompt is not Prompt.detections and detections is not None:
            raise UsageError(f"--detections is only used with --prompt detections, not {prompt.value}")
        if limit is not None and limit < 1:
            raise UsageError(f"--limit {limit}: must be a positive number of images")
        if sampler not in SAMPLERS:
            raise UsageError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        # the generator's own checks would come only after the model has loaded (or downloaded)
        check_generator_numbers({"pred_iou_thresh": pred_iou_thresh,
                                 "stability_score_thresh": stability_score_thresh, "box_nms_thresh": box_nms_thresh})
        if out is not None:
            check_output_path(out, folder=False)
            annotation_file = coco_root / "annotations" / f"instances_{split}.json"
            _refuse_out_over_inputs(out, [annotation_file, *([detections] if detections else []),
                                             *model_input_files(model)])
        rank, world = init_distributed_from_env()
        with _results_folder(out, world) as folder:
            report = _evaluate(coco_root, split, model, prompt, detections, limit, out, restart, folder, rank, world,
                               {"sampler": sampler, "points_per_side": points_per_side,
                                "pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh,
                                "box_nms_thresh": box_nms_thresh},
                               points_per_batch, device, offline)
        if rank == 0:
            console.print(_table(report))
            if out is not None:
                atomic_write_text(out, json.dumps(report, indent=1) + "\n")
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()


def _evaluate(coco_root: Path, split_name: str, model: str, prompt: Prompt, detections: Optional[Path],
              limit: Optional[int], out: Optional[Path], restart: bool, folder: Path, rank: int, world: int,
              everything: dict, batch: int, device: str, offline: bool) -> dict:
    """Check every input, run this rank's images, and (on rank 0) score the whole selection."""
    from slimseg.cli.compress import device_for_rank
    from slimseg.compress.distributed import all_true
    from slimseg.data.coco import load_coco_split, load_detections
    from slimseg.devices import resolve_device
    from slimseg.evaluation.coco import CocoEvaluation, ResultStore, RunningMetric, protocol, score_records
    from slimseg.inference.everything import MaskGenerator
    from slimseg.inference.predictor import Predictor
    from slimseg.zoo import load_model

    split = load_coco_split(coco_root, split_name)
    if out is not None:  # the images are inputs too; their names are known only now
        refuse_overwriting_inputs(out, [split.image_path(image) for image in split.images], "--out")
    images = split.select(limit)
    boxes = load_detections(detections, split) if detections is not None else {}
    settings = _settings(split, prompt, model, detections, everything)
    store = ResultStore(folder, settings)
    store.check(restart)
    sam = load_model(model, device=resolve_device(device_for_rank(device)), offline=offline)
    if prompt is Prompt.everything:
        evaluation = CocoEvaluation(split, prompt.value, generator=MaskGenerator(
            sam, sampler=everything["sampler"], points_per_side=everything["points_per_side"],
            points_per_batch=batch, pred_iou_thresh=everything["pred_iou_thresh"],
            stability_score_thresh=everything["stability_score_thresh"],
            box_nms_thresh=everything["box_nms_thresh"], output_mode="coco_rle"), batch=batch)
    else:
        evaluation = CocoEvaluation(split, prompt.value, predictor=Predictor(sam), detections=boxes, batch=batch)
    if rank == 0:
        store.prepare(restart)
    all_true(True)  # barrier: the folder exists (and was emptied on --restart) before anyone reads it
    resumed = len({image["id"] for image in images}.intersection(store.records())) if rank == 0 else 0
    running = RunningMetric(prompt.value)
    with _progress(rank == 0) as progress:
        task = progress.add_task("evaluating", total=len(images[rank::world]), metric=running.text())

        def on_image(record: dict, was_stored: bool) -> None:
            running.add(record)
            progress.update(task, advance=1, metric=running.text())

        evaluation.run(images, store, rank, world, on_image)
    if rank != 0:
        return {}
    metrics = score_records(split, images, store.records(), prompt.value)
    return {"command": "eval-coco", "model": model, "coco_root": str(coco_root), "split": split_name,
            "prompt": prompt.value, "images": len(images), "limit": limit, "protocol": protocol(prompt.value),
            "settings": settings, "metrics": metrics, "world_size": world, "resumed_images": resumed,
            "per_image_results": str(folder) if out is not None else None}
