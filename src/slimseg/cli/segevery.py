"""``slimseg segevery``: segment everything, with a 32x32 point grid or AutoPPN's proposals."""

from __future__ import annotations

import csv
import io
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import torch
import typer

from slimseg.cli.backends import Backend, BackendOption, check_backend_options, open_model
from slimseg.cli.batch import EmbeddedImages, for_each_image
from slimseg.cli.common import (
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    NullOption,
    OfflineOption,
    RecursiveOption,
    check_generator_numbers,
    check_output_path,
    user_errors,
)
from slimseg.cli.inputs import ImageInput, expand_inputs
from slimseg.errors import UsageError
from slimseg.inference.compilation import compile_model, first_compiled_call
from slimseg.inference.everything.options import MAX_CROP_N_LAYERS, MAX_POINTS_PER_SIDE
from slimseg.inference.masks import decode_rle
from slimseg.inference.predictor import ImageEmbedding
from slimseg.io import (
    atomic_write_text,
    json_dumps_strict,
    remove_numbered_files,
    render_overlay,
    write_image_png,
    write_mask_png,
)

if TYPE_CHECKING:
    from slimseg.inference.everything import MaskGenerator

# exactly the names _write_image_outputs gives mask PNGs, f"{n}.png" as segment-anything's
# amg.py does; only files named so are ever removed
_MASK_FILE = re.compile(r"(0|[1-9]\d*)\.png")
_METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")


class EveryFormat(str, Enum):
    rle = "rle"
    png = "png"
    coco = "coco"


class Sampler(str, Enum):
    grid = "grid"
    autoppn = "autoppn"


COCO_FILE = "annotations.json"


def _metadata_csv(records: list[dict]) -> str:
    """segment-anything's amg.py metadata.csv, one row per mask."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    buffer.write(_METADATA_HEADER + "\n")
    for index, record in enumerate(records):
        writer.writerow([index, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
                         record["stability_score"], *record["crop_box"]])
    return buffer.getvalue()


class CocoCollector:
    """COCO-format annotations for a whole run (class-agnostic: one category, "object")."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, image: ImageInput, height: int, width: int, records: list[dict]) -> int:
        """Add an image and its masks; return the image's id in the file."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": str(image.path), "height": height, "width": width})
        for record in records:
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": record["segmentation"], "area": record["area"], "bbox": record["bbox"],
                "score": record["predicted_iou"], "stability_score": record["stability_score"],
                "point_coords": record["point_coords"],
            })
        return image_id

    def write(self, path: Path, given: int, interrupted: bool) -> None:
        """``given``: the run's number of images; ``interrupted``: the run was stopped (Ctrl-C,
        SIGTERM), so that the file, valid COCO either way, says it covers only part of them."""
        done = len(self.images)
        description = f"slimseg segevery: masks of {done} of {given} image(s)"
        if interrupted:
            description += " (the run was interrupted)"
        payload = {"info": {"description": description, "complete": not interrupted},
                   "images": self.images, "annotations": self.annotations,
                   "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
        atomic_write_text(path, json_dumps_strict(payload) + "\n")


def _check_sampling(sampler: Sampler, points_per_side: int | None, layers: int, factor: int,
                    proposal_options_given: bool) -> None:
    """Option combinations MaskGenerator would refuse only after the model has loaded."""
    if proposal_options_given and sampler is not Sampler.autoppn:
        raise UsageError("--max-proposals and --proposal-thresh apply to --sampler autoppn")
    if sampler is Sampler.grid and points_per_side is not None and int(points_per_side / factor**layers) < 1:
        raise UsageError(f"--points-per-side {points_per_side} with --crop-n-points-downscale-factor {factor} "
                         f"leaves no points in crop layer {layers}")


def _check_out(out: Path | None, fmt: EveryFormat, overlay: bool) -> None:
    if out is None:
        if overlay or fmt is not EveryFormat.rle:
            raise UsageError("--format png/coco and --overlay write files: give --out DIR")
        return
    check_output_path(out, folder=True)
    if fmt is EveryFormat.coco:
        check_output_path(out / COCO_FILE, folder=False)


def _write_image_outputs(image: ImageInput, rgb: np.ndarray, records: list[dict], fmt: EveryFormat, out: Path,
                         overlay: bool) -> dict[str, str | int]:
    """Write this image's own files; return the paths written, for its stdout record (an
    image whose name collided with another's is written under ``<name>_2``)."""
    masks = [decode_rle(record["segmentation"]) for record in records]
    written: dict[str, str | int] = {}
    if fmt is EveryFormat.rle:
        path = out / f"{image.key}.json"
        atomic_write_text(path, json_dumps_strict(records) + "\n")
        written["output"] = str(path)
    elif fmt is EveryFormat.png:
        for index, mask in enumerate(masks):
            write_mask_png(out / image.key / f"{index}.png", mask)
        remove_numbered_files(out / image.key, _MASK_FILE, len(masks))
        atomic_write_text(out / image.key / "metadata.csv", _metadata_csv(records))
        written["output"] = str(out / image.key)
    if overlay:
        # largest first, so small masks stay visible on top
        order = np.argsort([-record["area"] for record in records], kind="stable")
        path = out / f"{image.key}.overlay.png"
        write_image_png(path, render_overlay(rgb, [masks[i] for i in order]))
        written["overlay"] = str(path)
    return written


def _compile_decoder(generator: MaskGenerator) -> None:
    """torch.compile the mask decoder, SegEvery's dominant stage, and compile it now with a
    batch of points on a blank embedding, as SegEvery's batches call it."""
    predictor = generator.predictor
    model = predictor.model
    compile_model(model, parts=("mask_decoder",))

    def decode_blank() -> None:
        blank = torch.zeros_like(model.prompt_encoder.get_dense_pe())
        size = (model.img_size, model.img_size)
        predictor.set_embedding(ImageEmbedding(blank, size, size))
        points = torch.full((generator.points_per_batch, 1, 2), size[0] / 2, device=blank.device)
        labels = torch.ones(generator.points_per_batch, 1, dtype=torch.int, device=blank.device)
        predictor.predict_low_res(points, labels, multimask_output=True)
        predictor.reset_image()

    first_compiled_call(decode_blank)


def segevery(
    images: Annotated[list[str], typer.Argument(metavar="IMAGES", help="Image files, folders, quoted globs, or - to read paths from stdin (one per line, or NUL-separated with --null).", show_default=False)],
    model: ModelOption = "sam-b",
    sampler: Annotated[Sampler, typer.Option("--sampler", help="grid: SAM's regular point grid; autoppn: points proposed by the model's AutoPPN (lite-sam, or a model trained with `slimseg train --stage autoppn`), at most 256 instead of 1024.")] = Sampler.grid,
    max_proposals: Annotated[Optional[int], typer.Option("--max-proposals", min=1, help="AutoPPN sampler: keep at most this many proposed points (the model's top_k, 256, by default).", show_default=False)] = None,
    proposal_thresh: Annotated[Optional[float], typer.Option("--proposal-thresh", min=0.0, max=0.999, help="AutoPPN sampler: keep heatmap peaks scoring above this (the model's threshold, 0.05, by default).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for the masks (created if missing); without it only the JSON lines are printed.", show_default=False)] = None,
    fmt: Annotated[EveryFormat, typer.Option("--format", "-f", help="rle: OUT/<image>.json, a list of SAM records with COCO RLE (as segment-anything's amg.py --convert-to-rle); png: OUT/<image>/<i>.png masks (0/255) + metadata.csv; coco: OUT/annotations.json for the whole run (images, annotations, one 'object' category).")] = EveryFormat.rle,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write OUT/<image>.overlay.png with every mask in colour.")] = False,
    points_per_side: Annotated[Optional[int], typer.Option("--points-per-side", min=1, max=MAX_POINTS_PER_SIDE, help=f"Grid sampler: points per image side (32 → 1024 prompts), at most {MAX_POINTS_PER_SIDE}.")] = 32,
    points_per_batch: Annotated[int, typer.Option("--points-per-batch", min=1, help="Prompts decoded together (memory vs speed).")] = 64,
    pred_iou_thresh: Annotated[float, typer.Option("--pred-iou-thresh", help="Keep masks whose predicted IoU is above this (0 disables).")] = 0.88,
    stability_score_thresh: Annotated[float, typer.Option("--stability-score-thresh", help="Keep masks whose stability score is at least this (0 disables).")] = 0.95,
    stability_score_offset: Annotated[float, typer.Option("--stability-score-offset", help="Logit offset of the stability score.")] = 1.0,
    box_nms_thresh: Annotated[float, typer.Option("--box-nms-thresh", help="Box IoU above which duplicate masks are suppressed.")] = 0.7,
    crop_n_layers: Annotated[int, typer.Option("--crop-n-layers", min=0, max=MAX_CROP_N_LAYERS, help=f"Extra layers of image crops (layer i has 4^i crops), at most {MAX_CROP_N_LAYERS}.")] = 0,
    crop_nms_thresh: Annotated[float, typer.Option("--crop-nms-thresh", help="Box IoU for suppressing duplicates between crops.")] = 0.7,
    crop_overlap_ratio: Annotated[float, typer.Option("--crop-overlap-ratio", help="Overlap between crops, as a fraction of the image's short side.")] = 512 / 1500,
    crop_n_points_downscale_factor: Annotated[int, typer.Option("--crop-n-points-downscale-factor", min=1, help="Grid points per side divided by this per crop layer.")] = 1,
    min_mask_region_area: Annotated[int, typer.Option("--min-mask-region-area", min=0, help="Remove holes and islands smaller than this many pixels (0 disables).")] = 0,
    recursive: RecursiveOption = False,
    null: NullOption = False,
    backend: BackendOption = Backend.torch,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the mask decoder before the first image (about a minute on a CPU): SegEvery then decodes faster (1.2x for Lite-SAM's grid on 2 CPU cores), which pays over a few dozen images.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    batch_size: BatchSizeOption = 1,
    offline: OfflineOption = False,
) -> None:
    """Segment everything in each image; one JSON line per image (masks, timing) on stdout.

    Options and defaults are segment-anything's automatic mask generator's (tuned for SAM-H;
    smaller models usually need lower thresholds).
    """
    from slimseg.inference.everything import MaskGenerator

    with user_errors():
        # every check that needs no model first: a mistyped option must not cost a model load
        _check_out(out, fmt, overlay)
        check_generator_numbers({"pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh,
                        "stability_score_offset": stability_score_offset, "box_nms_thresh": box_nms_thresh,
                        "crop_nms_thresh": crop_nms_thresh, "crop_overlap_ratio": crop_overlap_ratio})
        _check_sampling(sampler, points_per_side, crop_n_layers, crop_n_points_downscale_factor,
                        max_proposals is not None or proposal_thresh is not None)
        if compile_ and backend is Backend.onnx:
            raise UsageError("--compile applies to --backend torch; onnxruntime optimises the exported graphs itself")
        check_backend_options(backend, device, dtype)
        inputs = expand_inputs(images, recursive=recursive, null_separated=null)
        network = open_model(backend, model, device, offline, dtype)
        generator = MaskGenerator(
            network, sampler=sampler.value, points_per_side=points_per_side,
            points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area, output_mode="coco_rle",
            max_proposals=max_proposals, proposal_thresh=proposal_thresh, encoder_batch_size=batch_size,
            dtype=None if backend is Backend.onnx else dtype,
        )
        if compile_:
            _compile_decoder(generator)
        embedded = EmbeddedImages(inputs, batch_size, generator.embed)
        coco = CocoCollector() if fmt is EveryFormat.coco else None

        def process(image: ImageInput) -> dict:
            rgb, embeddings = embedded.take(image)
            records = generator.generate(rgb, embeddings)
            written = {} if out is None else _write_image_outputs(image, rgb, records, fmt, out, overlay)
            if coco is not None:
                written["output"] = str(out / COCO_FILE)
                written["image_id"] = coco.add(image, rgb.shape[0], rgb.shape[1], records)
            timings = {name: round(value, 4) for name, value in getattr(generator, "last_timings", {}).items()}
            return {"image": str(image.path), "width": rgb.shape[1], "height": rgb.shape[0], "masks": len(records),
                    **written, "sampler": sampler.value, "timings": timings}

        interrupted = False
        try:
            for_each_image(inputs, "segmenting everything", process)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the images done are still written
            interrupted = True
            raise
        finally:
            if coco is not None:
                coco.write(out / COCO_FILE, len(inputs), interrupted)
