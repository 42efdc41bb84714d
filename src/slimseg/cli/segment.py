"""``slimseg segment``: masks for box and point prompts, one encoder pass per image."""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from slimseg.cli.backends import Backend, BackendOption, check_backend_options, open_model
from slimseg.cli.batch import EmbeddedImages, for_each_image
from slimseg.cli.common import (DeviceOption, DtypeOption, ImageBatchSizeOption, ModelOption, NullOption,
                                OfflineOption, RecursiveOption, check_output_path, user_errors)
from slimseg.cli.inputs import ImageInput, expand_inputs
from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.masks import encode_rle, mask_to_box_xywh
from slimseg.inference.precision import parse_dtype
from slimseg.inference.predictor import Predictor
from slimseg.inference.prompts import Prompt, PromptResult, fit_to_image, load_prompts_file, predict_prompts, prompts_from_options
from slimseg.io import (
    atomic_write_text,
    json_dumps_strict,
    remove_numbered_files,
    render_overlay,
    write_image_png,
    write_mask_png,
)

# exactly the names _write_outputs gives mask PNGs, f"mask_{n:03d}.png" (three digits, more
# only without a leading zero); only files named so are ever removed
_MASK_FILE = re.compile(r"mask_(\d{3}|[1-9]\d{3,})\.png")


def make_predictor(backend: Backend, model: str, device: str, offline: bool, dtype: str = "float32") -> Predictor:
    """The torch Predictor, or the same API over an export folder run by onnxruntime."""
    network = open_model(backend, model, device, offline, dtype)
    return network.make_predictor() if backend is Backend.onnx else Predictor(network, dtype=parse_dtype(dtype))


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    png = "png"
    rle = "rle"


class PromptSource:
    """Prompts for each image: the command-line ones, plus a prompts file's entry for it."""

    def __init__(self, boxes: list[str], points: list[str], prompts_file: Path | None) -> None:
        self.common = prompts_from_options(boxes, points)
        loaded = load_prompts_file(prompts_file) if prompts_file else []
        self.per_image = loaded if isinstance(loaded, dict) else {}
        if isinstance(loaded, list):
            self.common += loaded
        if not self.common and not any(self.per_image.values()):
            if prompts_file:
                raise UsageError(f"{prompts_file}: the prompts file holds no prompts (and no --box or --point was given)")
            raise UsageError("no prompts: give --box, --point or --prompts FILE")

    def has_prompts(self, image: ImageInput) -> bool:
        return bool(self.common or self._own(image))

    def for_image(self, image: ImageInput) -> list[Prompt]:
        prompts = self.common + self._own(image)
        if not prompts:
            raise SlimsegError(f"{image.path}: no prompts for this image in the prompts file")
        return prompts

    def _own(self, image: ImageInput) -> list[Prompt]:
        names = (str(image.path), image.path.as_posix(), str(image.path.resolve()), image.key, image.path.name)
        return next((self.per_image[name] for name in names if name in self.per_image), [])


def _mask_entries(results: list[PromptResult]) -> list[tuple[int, int, np.ndarray, float]]:
    """(prompt index, candidate index, mask, score), candidates best first."""
    entries = []
    for prompt_index, result in enumerate(results):
        for candidate, order in enumerate(np.argsort(-result.scores, kind="stable")):
            entries.append((prompt_index, candidate, result.masks[order], float(result.scores[order])))
    return entries


def _write_outputs(image: ImageInput, rgb: np.ndarray, results: list[PromptResult], fmt: OutputFormat,
                   out: Path | None, overlay: bool) -> dict:
    """Write this image's files (atomically) and return its JSON record."""
    height, width = rgb.shape[:2]
    record: dict = {"image": str(image.path), "width": width, "height": height, "masks": []}
    for n, (prompt_index, candidate, mask, score) in enumerate(_mask_entries(results)):
        # a broken model (NaN weights) gives a NaN score: null keeps the line strict JSON
        shown_score = round(score, 6) if math.isfinite(score) else None
        entry = {"prompt": prompt_index, "candidate": candidate, "score": shown_score,
                 "area": int(mask.sum()), "bbox": mask_to_box_xywh(mask)}
        if fmt is OutputFormat.png:
            path = out / image.key / f"mask_{n:03d}.png"
            write_mask_png(path, mask)
            entry["file"] = str(path)
        else:
            entry["segmentation"] = encode_rle(mask)
        record["masks"].append(entry)
    if fmt is OutputFormat.png:
        remove_numbered_files(out / image.key, _MASK_FILE, len(record["masks"]))
    record["prompts"] = [result.prompt.to_json() for result in results]
    if fmt is OutputFormat.rle:
        path = out / f"{image.key}.json"
        atomic_write_text(path, json_dumps_strict(record) + "\n")
        # after writing: the file need not name itself; the stdout line says where it went,
        # which is "<name>_2.json" for an image whose name collided with another's
        record["output"] = str(path)
    if overlay:
        best = [result.masks[int(np.argmax(result.scores))] for result in results]
        picture = render_overlay(
            rgb, best, boxes=[r.prompt.box for r in results if r.prompt.box is not None],
            points=[(x, y, label) for r in results for (x, y), label in zip(r.prompt.points, r.prompt.labels)],
        )
        path = out / f"{image.key}.overlay.png"
        write_image_png(path, picture)
        record["overlay"] = str(path)
    return record


def segment(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, quoted globs, or - to read paths from stdin (one per line, or NUL-separated with --null).",
                                                metavar="IMAGES", show_default=False)],
    model: ModelOption = "sam-b",
    box: Annotated[Optional[list[str]], typer.Option("--box", "-b", metavar="X0,Y0,X1,Y1", help="Box prompt x0,y0,x1,y1 in pixels; repeat for several objects.", show_default=False)] = None,
    point: Annotated[Optional[list[str]], typer.Option("--point", "-p", metavar="X,Y[,LABEL]", help="Point prompt x,y[,label] in pixels, label 1 = foreground (default) or 0 = background; all points form one object (with the box if exactly one is given).", show_default=False)] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", metavar="FILE", help="JSON prompts file: a list of {\"box\": \\[x0,y0,x1,y1], \"points\": \\[\\[x,y,label], ..]} for every image, or an object mapping image paths/names to such lists.", show_default=False)] = None,
    multimask: Annotated[bool, typer.Option("--multimask/--single", help="Keep SAM's three candidate masks per prompt (ranked by score) or decode one mask.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for mask files and overlays (created if missing).", show_default=False)] = None,
    fmt: Annotated[Optional[OutputFormat], typer.Option("--format", "-f", help="jsonl: COCO-RLE masks in one JSON line per image on stdout (default without --out); png: 0/255 PNG per mask in OUT/<image>/ (default with --out); rle: OUT/<image>.json with COCO-RLE masks.", show_default=False)] = None,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write OUT/<image>.overlay.png: the best mask of each prompt in colour, prompts drawn (needs --out).")] = False,
    recursive: RecursiveOption = False,
    null: NullOption = False,
    backend: BackendOption = Backend.torch,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    batch_size: ImageBatchSizeOption = 1,
    offline: OfflineOption = False,
) -> None:
    """Segment objects given by box and point prompts, one JSON line per image on stdout.

    The exit status is 0 when every image succeeded, 1 when any failed (each failure is
    reported on stderr and the other images are still processed), 2 for bad options.
    """
    with user_errors():
        fmt = fmt or (OutputFormat.png if out else OutputFormat.jsonl)
        if fmt is not OutputFormat.jsonl and out is None:
            raise UsageError(f"--format {fmt.value} writes files: give --out DIR")
        if fmt is OutputFormat.jsonl and out is not None and not overlay:
            raise UsageError("--format jsonl writes to stdout only: use --format png or rle with --out")
        if overlay and out is None:
            raise UsageError("--overlay writes pictures: give --out DIR")
        if out is not None:
            check_output_path(out, folder=True)
        source = PromptSource(box or [], point or [], prompts)
        check_backend_options(backend, device, dtype)
        inputs = expand_inputs(images, recursive=recursive, null_separated=null)
        predictor = make_predictor(backend, model, device, offline, dtype)
        # an image without prompts fails before it is read, and takes no place in a batch
        embedded = EmbeddedImages([image for image in inputs if source.has_prompts(image)], batch_size,
                                  predictor.embed_images)

        def process(image: ImageInput) -> dict:
            image_prompts = source.for_image(image)
            rgb, embedding = embedded.take(image)
            height, width = rgb.shape[:2]
            image_prompts = [fit_to_image(p, height, width) for p in image_prompts]
            predictor.set_embedding(embedding)
            return _write_outputs(image, rgb, predict_prompts(predictor, image_prompts, multimask), fmt, out, overlay)

        for_each_image(inputs, "segmenting", process)
