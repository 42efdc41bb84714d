"""One COCO evaluation run: per-image predictions (sharded over torchrun ranks, stored for
resume), then the merged score and the report.

Image i of the selection goes to rank ``i % world``; every rank appends its finished images
to its own part of the ``ResultStore``; once all ranks are done, rank 0 reads every part
and scores the whole selection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slimseg.compress.distributed import all_true
from slimseg.data.coco import CocoSplit, annotation_mask, read_coco_image
from slimseg.errors import SlimsegError
from slimseg.evaluation.coco.predict import (
    box_prompt_masks,
    detection_results,
    everything_results,
    interior_point,
    point_prompt_masks,
    xywh_to_xyxy,
)
from slimseg.evaluation.coco.scoring import average_recall, instance_records, miou_table, segm_ap
from slimseg.evaluation.coco.store import ResultStore
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.predictor import Predictor
from slimseg.validation import as_integer

__all__ = ["PROMPTS", "CocoEvaluation", "RunningMetric", "protocol", "score_records", "shard"]

PROMPTS = ("box", "point", "everything", "detections")

_SINGLE_PROMPT = {
    "mask_selection": "multimask_output=True; of the 3 masks, the one with the highest predicted IoU",
    "crowd": "iscrowd=1 annotations are neither prompted nor scored",
    "ground_truth": "each annotation's polygons or RLE rasterised by pycocotools at full image size",
    "metric": "IoU of the chosen mask with the ground truth per instance; mIoU = mean over instances, in percent",
    "area_ranges": "by the annotation's area: small < 32^2, medium 32^2..96^2, large > 96^2",
    "empty_instances": "annotations whose rasterised mask is empty are skipped (counted in 'skipped_empty')",
}
_PROTOCOLS = {
    "box": {"prompt": "one box per instance: its annotation bbox [x, y, w, h] as [x, y, x+w, y+h]",
            **_SINGLE_PROMPT},
    "point": {"prompt": "one positive point per instance at its mask's most interior pixel (maximum of the "
                        "distance transform, the image border counting as boundary)", **_SINGLE_PROMPT},
    "everything": {
        "masks": "SegEvery (slimseg MaskGenerator) with the sampler and options in 'settings'",
        "scoring": "pycocotools COCOeval, iouType=segm, useCats=0 (class-agnostic), maxDets=[10, 100, 1000]; "
                   "AR@K = recall averaged over IoU 0.50:0.95 with the K best-scored masks per image",
        "score": "each mask's predicted IoU",
        "crowd": "COCOeval's: iscrowd=1 annotations are ignore regions (matching them neither helps nor hurts)",
        "timing": "seconds per image = MaskGenerator time (encoder, proposer, decoder, post-processing), "
                  "image decoding excluded",
    },
    "detections": {
        "prompt": "each detection's box [x, y, w, h] as [x, y, x+w, y+h]",
        "mask_selection": _SINGLE_PROMPT["mask_selection"],
        "scoring": "pycocotools COCOeval, iouType=segm, useCats=1, default maxDets [1, 10, 100]; category and "
                   "score of each mask are the detector's",
        "crowd": "COCOeval's: iscrowd=1 annotations are ignore regions",
    },
}


def protocol(prompt: str) -> dict:
    """How ``prompt`` is evaluated, in words (goes into the report)."""
    return dict(_PROTOCOLS[prompt])


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share: items rank, rank + world, ...; the shares of all ranks partition ``items``."""
    return items[rank::world]


@dataclass
class CocoEvaluation:
    """What to run on each image. Give ``predictor`` for box/point/detections (``detections``:
    per image id, the detector's boxes), ``generator`` for everything."""

    split: CocoSplit
    prompt: str
    predictor: Predictor | None = None
    generator: MaskGenerator | None = None
    detections: dict[int, list[dict]] = field(default_factory=dict)
    batch: int = 64

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise SlimsegError(f"prompt {self.prompt!r}: choose one of {', '.join(PROMPTS)}")
        self.batch = as_integer(self.batch, "batch (prompts per decoder call)", 1)
        needs_generator = self.prompt == "everything"
        if (self.generator if needs_generator else self.predictor) is None:
            raise SlimsegError(f"prompt {self.prompt!r} needs a {'generator' if needs_generator else 'predictor'}")

    def image_record(self, image: dict) -> dict:
        """The stored result of one image: ``instances`` (box/point) or COCO ``results``."""
        rgb = read_coco_image(self.split, image)
        started = time.perf_counter()
        record: dict = {"image_id": image["id"]}
        if self.prompt == "everything":
            record["results"], record["seconds"] = everything_results(self.generator, rgb, image["id"])
            return record
        self.predictor.set_image(rgb)
        try:
            if self.prompt == "detections":
                record["results"] = detection_results(self.predictor, self.detections.get(image["id"], []),
                                                      image["id"], self.batch)
            else:
                record["instances"], record["skipped_empty"] = self._prompted_instances(image)
        finally:
            self.predictor.reset_image()
        record["seconds"] = time.perf_counter() - started
        return record

    def _prompted_instances(self, image: dict) -> tuple[list[dict], int]:
        height, width = int(image["height"]), int(image["width"])
        annotations, masks = [], []
        for annotation in self.split.annotations.get(image["id"], []):
            if annotation.get("iscrowd"):
                continue
            mask = annotation_mask(annotation, height, width)
            if mask.any():
                annotations.append(annotation)
                masks.append(mask)
        skipped = sum(1 for a in self.split.annotations.get(image["id"], []) if not a.get("iscrowd")) - len(masks)
        if not masks:
            return [], skipped
        gt = np.stack(masks)
        if self.prompt == "box":
            prompts = xywh_to_xyxy(np.array([a["bbox"] for a in annotations]))
            predicted, scores = box_prompt_masks(self.predictor, prompts, self.batch)
        else:
            prompts = np.array([interior_point(mask) for mask in masks])
            predicted, scores = point_prompt_masks(self.predictor, prompts, self.batch)
        return instance_records(annotations, gt, predicted, scores, prompts), skipped

    def run(self, images: list[dict], store: ResultStore, rank: int = 0, world: int = 1,
            on_image: Callable[[dict, bool], None] | None = None) -> None:
        """Evaluate this rank's share of ``images`` that the store does not hold yet.

        ``on_image(record, resumed)`` is called for each image of the share, first for
        those found in the store (``resumed=True``). Every rank must call ``run``: it ends
        with a collective, and raises on every rank if any rank failed.
        """
        failure: BaseException | None = None
        try:
            done = store.records()
            mine = shard(images, rank, world)
            for image in mine:
                if image["id"] in done and on_image is not None:
                    on_image(done[image["id"]], True)
            store.open(rank)
            try:
                for image in mine:
                    if image["id"] in done:
                        continue
                    record = self.image_record(image)
                    store.append(record)
                    if on_image is not None:
                        on_image(record, False)
            finally:
                store.close()
        except (SlimsegError, OSError) as error:
            failure = error
        # The collective is also the barrier: no rank scores before all parts are complete.
        everyone_ok = all_true(failure is None)
        if failure is not None:
            raise failure
        if not everyone_ok:
            raise SlimsegError("another process of this torchrun failed (see its message); rerun to resume")


def score_records(split: CocoSplit, images: list[dict], records: dict[int, dict], prompt: str) -> dict:
    """Metrics of ``prompt`` over ``images`` from their per-image ``records`` (by image id).

    Returns:
        box/point: ``miou_table`` plus ``skipped_empty``; everything: ``average_recall``;
        detections: ``segm_ap``. Always ``seconds_per_image``.
    """
    if prompt not in PROMPTS:
        raise SlimsegError(f"prompt {prompt!r}: choose one of {', '.join(PROMPTS)}")
    missing = [image["id"] for image in images if image["id"] not in records]
    if missing:
        raise SlimsegError(f"no result for {len(missing)} image(s) (first id {missing[0]}); rerun to complete them")
    chosen = [records[image["id"]] for image in images]
    seconds = float(np.mean([r["seconds"] for r in chosen])) if chosen else 0.0
    if prompt in ("box", "point"):
        metrics = miou_table(instance for r in chosen for instance in r["instances"])
        metrics["skipped_empty"] = sum(r.get("skipped_empty", 0) for r in chosen)
    else:
        results = [result for r in chosen for result in r["results"]]
        ground_truth = split.ground_truth(image["id"] for image in images)
        metrics = average_recall(ground_truth, results) if prompt == "everything" else segm_ap(ground_truth, results)
        metrics["masks_per_image"] = len(results) / max(len(chosen), 1)
    metrics["seconds_per_image"] = seconds
    return metrics


class RunningMetric:
    """The figure a progress bar shows while images finish: mIoU so far (box/point), or
    masks and seconds per image (everything/detections, whose COCOeval needs every image)."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.images = 0
        self.iou_sum = 0.0
        self.instances = 0
        self.masks = 0
        self.seconds = 0.0

    def add(self, record: dict) -> None:
        self.images += 1
        self.seconds += record.get("seconds", 0.0)
        for instance in record.get("instances", ()):
            self.iou_sum += instance["iou"]
            self.instances += 1
        self.masks += len(record.get("results", ()))

    def text(self) -> str:
        if self.prompt in ("box", "point"):
            return f"mIoU {100.0 * self.iou_sum / self.instances:.2f}" if self.instances else "mIoU -"
        per_image = max(self.images, 1)
        return f"{self.masks / per_image:.1f} masks/img  {self.seconds / per_image:.3f} s/img"
