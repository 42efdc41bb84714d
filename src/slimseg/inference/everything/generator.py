"""``MaskGenerator``: segment everything in an image, as segment-anything's
``SamAutomaticMaskGenerator`` does (same arguments, filters, order and records), with the
prompts taken from a point grid or from an AutoPPN point proposer."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from slimseg.devices import synchronize
from slimseg.errors import SlimsegError
from slimseg.inference.everything.boxes import (
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from slimseg.inference.everything.crops import nonempty_crop_boxes, uncrop_masks
from slimseg.inference.everything.data import MaskBatch, stability_score
from slimseg.inference.everything.options import check_generator_options
from slimseg.inference.everything.rle import (
    area_from_rle,
    coco_encode_rle,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
)
from slimseg.inference.predictor import ImageEmbedding, Predictor, checked_image, checked_image_list
from slimseg.modeling.autoppn import propose_points
from slimseg.validation import as_integer

__all__ = ["MaskGenerator", "PointProposer"]

# (image crop HxWx3 uint8 RGB, predictor with that crop set) -> (N, 2) XY points in crop pixels.
PointProposer = Callable[[np.ndarray, Predictor], np.ndarray]

TIMING_KEYS = ("encoder", "proposer", "decoder", "postprocess", "total")


class _Clock:
    """Seconds per named stage; waits for queued GPU work so each stage is charged its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(TIMING_KEYS, 0.0)
        self.started = self.now()

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def charge(self, stage: str, since: float) -> None:
        self.seconds[stage] += self.now() - since

    def credit(self, stage: str, seconds: float) -> None:
        """Count work done before this clock started (an encoder pass shared by a batch)."""
        self.seconds[stage] += seconds
        self.started -= seconds

    def finish(self) -> dict[str, float]:
        total = self.now() - self.started
        measured = self.seconds["encoder"] + self.seconds["proposer"] + self.seconds["decoder"]
        return {**self.seconds, "postprocess": max(total - measured, 0.0), "total": total}


class MaskGenerator:
    """Masks for everything in an image.

    With ``sampler="grid"`` (the default) every argument means what it means for
    segment-anything's ``SamAutomaticMaskGenerator`` and the records are the same.
    ``sampler="autoppn"`` replaces each crop's point grid by the points of
    ``point_proposer(crop, predictor)`` (called after the crop is embedded), or of the
    model's own AutoPPN (``model.autoppn``: lite-sam, or SAM + AutoPPN from ``slimseg train
    --stage autoppn``) when no proposer is given; ``max_proposals`` and ``proposal_thresh``
    then override its top_k (256) and peak score threshold (0.05). ``dtype`` is the
    precision of the model's forward passes (see :class:`~slimseg.inference.predictor.Predictor`).
    ``encoder_batch_size`` crops (or images, with :meth:`embed`) share one encoder pass.

    ``last_timings`` holds seconds per stage of the latest ``generate`` call
    (encoder, proposer, decoder, postprocess, total).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: float = 0,
        output_mode: str = "binary_mask",
        sampler: str = "grid",
        point_proposer: PointProposer | None = None,
        max_proposals: int | None = None,
        proposal_thresh: float | None = None,
        dtype: str | torch.dtype | None = None,
        encoder_batch_size: int = 1,
    ) -> None:
        # an exported model (slimseg.export.runtime.OnnxSam) brings its own Predictor
        exported = callable(getattr(model, "make_predictor", None))
        if not exported and not all(hasattr(model, part) for part in ("image_encoder", "prompt_encoder", "mask_decoder")):
            raise SlimsegError(f"MaskGenerator needs a SAM-family model, got {type(model).__name__}")
        self.point_grids = check_generator_options(
            points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids, min_mask_region_area=min_mask_region_area, output_mode=output_mode,
            sampler=sampler, point_proposer=point_proposer, max_proposals=max_proposals, proposal_thresh=proposal_thresh,
        )
        if sampler == "autoppn" and point_proposer is None:
            point_proposer = _model_proposer(
                model, None if max_proposals is None else int(max_proposals),
                None if proposal_thresh is None else float(proposal_thresh),
            )
        as_integer(encoder_batch_size, "encoder_batch_size", 1)
        if exported and dtype is not None:
            raise SlimsegError("dtype applies to PyTorch models; an exported model runs at the precision it was exported in")
        self.predictor = model.make_predictor() if exported else Predictor(model, dtype=dtype)
        # Python numbers, however they were given (0-d tensors and numpy scalars pass the checks)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = float(min_mask_region_area)
        self.output_mode = output_mode
        self.sampler = sampler
        self.point_proposer = point_proposer
        self.encoder_batch_size = int(encoder_batch_size)
        self.last_timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)

    @torch.no_grad()
    def generate(self, image: np.ndarray, embeddings: Sequence[ImageEmbedding] | None = None) -> list[dict[str, Any]]:
        """Records for the masks of an HxWx3 uint8 RGB image, in segment-anything's schema:
        segmentation (per ``output_mode``), area, bbox [x, y, w, h], predicted_iou,
        point_coords [[x, y]], stability_score, crop_box [x, y, w, h].

        ``embeddings``: this image's entry of :meth:`embed`, computed with other images in
        one encoder pass; by default the image's crops are embedded here.

        Safe to call from several threads at once: each call decodes with its own copy of the
        predictor (model shared), so no call sees another's current image."""
        records, self.last_timings = self._generate(image, embeddings)
        return records

    def _generate(
        self, image: np.ndarray, embeddings: Sequence[ImageEmbedding] | None
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        image = checked_image(image, self.predictor.transform)
        clock = _Clock(self.predictor.device)
        if embeddings is None:
            since = clock.now()
            embeddings = self.embed([image])[0]
            clock.charge("encoder", since)
        else:
            self._check_embeddings(image, embeddings)
            clock.credit("encoder", sum(embedding.seconds for embedding in embeddings))
        data = self._generate_masks(image, embeddings, self.predictor.fresh_copy(), clock)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return self._records(data), clock.finish()

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> list[list[ImageEmbedding]]:
        """Each image's crop embeddings (one crop unless ``crop_n_layers`` > 0), computed
        ``encoder_batch_size`` crops per encoder pass across all the images."""
        crops, counts = [], []
        for image in checked_image_list(images, "embed"):
            image = checked_image(image, self.predictor.transform)
            boxes, _ = nonempty_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            crops += [image[y0:y1, x0:x1, :] for x0, y0, x1, y1 in boxes]
            counts.append(len(boxes))
        step = self.encoder_batch_size
        flat = [e for start in range(0, len(crops), step) for e in self.predictor.embed_images(crops[start : start + step])]
        offsets = np.cumsum([0, *counts])
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(counts))]

    def _check_embeddings(self, image: np.ndarray, embeddings: Sequence[ImageEmbedding]) -> None:
        boxes, _ = nonempty_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
        sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in boxes]
        given = [getattr(embedding, "original_size", None) for embedding in embeddings]
        if given != sizes:
            raise SlimsegError(f"the embeddings do not belong to this image: its crops are {sizes}, the embeddings' {given}")

    def generate_timed(self, image: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """``generate`` plus the seconds spent per stage (see ``last_timings``)."""
        records, timings = self._generate(image, None)
        self.last_timings = timings
        return records, dict(timings)

    def _generate_masks(self, image: np.ndarray, embeddings: Sequence[ImageEmbedding], predictor: Predictor,
                        clock: _Clock) -> MaskBatch:
        height, width = image.shape[:2]
        crop_boxes, layers = nonempty_crop_boxes((height, width), self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskBatch()
        for crop_box, layer, embedding in zip(crop_boxes, layers, embeddings):
            data.extend(self._process_crop(image, crop_box, layer, embedding, predictor, clock))
        if len(crop_boxes) > 1 and len(data) > 0:
            # A mask found in several crops is kept from the smallest crop: the encoder saw
            # it there at the highest resolution.
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(data["boxes"].float(), scores, torch.zeros(len(data)), self.crop_nms_thresh)
            data.filter(keep)
        data.to_numpy()
        return data

    def _crop_points(self, crop: np.ndarray, layer: int, predictor: Predictor, clock: _Clock) -> np.ndarray:
        """(N, 2) float64 XY prompt points in crop pixels."""
        if self.sampler == "grid":
            return self.point_grids[layer] * np.array(crop.shape[1::-1])[None, :]
        since = clock.now()
        points = np.asarray(self.point_proposer(crop, predictor), dtype=np.float64)
        clock.charge("proposer", since)
        if points.size == 0:
            return np.zeros((0, 2))
        if points.ndim != 2 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
            raise SlimsegError(f"the point proposer must return finite (N, 2) XY points, got shape {points.shape}")
        return points

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int, embedding: ImageEmbedding,
                      predictor: Predictor, clock: _Clock) -> MaskBatch:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        predictor.set_embedding(embedding)
        points = self._crop_points(crop, layer, predictor, clock)

        data = _empty_batch(predictor.device)
        step = self.points_per_batch
        for start in range(0, len(points), step):
            data.extend(self._process_batch(points[start : start + step], crop_box, image.shape, predictor, clock))
        predictor.reset_image()

        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(len(data)), self.box_nms_thresh)
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor(crop_box, dtype=torch.long).repeat(len(data), 1)
        return data

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], image_shape: tuple[int, ...], predictor: Predictor,
        clock: _Clock,
    ) -> MaskBatch:
        """Decode one batch of points (crop pixels) and keep the masks that pass the filters."""
        device = predictor.device
        height, width = image_shape[:2]
        crop_size = (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])
        since = clock.now()
        # float64 as segment-anything feeds them (the prompt encoder normalises before its
        # float32 cast); MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        coords = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), dtype=dtype, device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        low_res, iou_preds = predictor.predict_low_res(coords[:, None, :], labels[:, None], multimask_output=True)
        per_point = low_res.shape[1]
        data = MaskBatch(
            low_res=low_res.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(np.repeat(points, per_point, axis=0)),
        )
        del low_res
        # The IoU filter needs no pixels, so it runs before upscaling and only the survivors
        # are upscaled: the same masks as filtering after, as segment-anything does, for a
        # fraction of the work (upscaling every candidate dominates the cost otherwise).
        if self.pred_iou_thresh > 0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        data["masks"] = predictor.upscale_masks(data["low_res"][:, None])[:, 0]
        del data["low_res"]
        clock.charge("decoder", since)

        # A threshold of 0 disables its filter, as in segment-anything (this also keeps
        # masks whose stability is NaN, i.e. with no pixel above threshold - offset).
        threshold = predictor.model.mask_threshold
        data["stability_score"] = stability_score(data["masks"], threshold, self.stability_score_offset)
        # Binarised before the next filter, so that it copies bytes rather than float logits.
        data["masks"] = data["masks"] > threshold
        if self.stability_score_thresh > 0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["boxes"] = batched_mask_to_box(data["masks"])
        data.filter(~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, width, height]))
        data["rles"] = mask_to_rle(uncrop_masks(data["masks"], crop_box, height, width))
        del data["masks"]
        return data

    @staticmethod
    def postprocess_small_regions(data: MaskBatch, min_area: float, nms_thresh: float) -> MaskBatch:
        """Fill small holes and drop small islands of every mask, then NMS again, preferring
        masks that needed no change. Edits ``data`` (numpy columns) in place and returns it."""
        if len(data) == 0:
            return data
        boxes, unchanged, changed_masks = [], [], {}
        for index, rle in enumerate(data["rles"]):
            mask, holes_changed = remove_small_regions(rle_to_mask(rle), min_area, mode="holes")
            mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
            changed = holes_changed or islands_changed
            unchanged.append(0.0 if changed else 1.0)
            boxes.append(batched_mask_to_box(torch.from_numpy(mask)))
            if changed:
                changed_masks[index] = mask
        boxes_tensor = torch.stack(boxes)
        keep = batched_nms(boxes_tensor.float(), torch.tensor(unchanged), torch.zeros(len(boxes)), nms_thresh)
        # Only the survivors that changed need a new encoding.
        for index in keep.tolist():
            if index in changed_masks:
                data["rles"][index] = mask_to_rle(torch.from_numpy(changed_masks[index])[None])[0]
                data["boxes"][index] = boxes_tensor[index].numpy()
        data.filter(keep)
        return data

    def _records(self, data: MaskBatch) -> list[dict[str, Any]]:
        records = []
        for index, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append({
                "segmentation": segmentation,
                "area": area_from_rle(rle),
                "bbox": box_xyxy_to_xywh(data["boxes"][index]),
                "predicted_iou": float(data["iou_preds"][index]),
                "point_coords": [data["points"][index].tolist()],
                "stability_score": float(data["stability_score"][index]),
                "crop_box": box_xyxy_to_xywh(data["crop_boxes"][index]),
            })
        return records


def _empty_batch(device: torch.device) -> MaskBatch:
    """A crop's columns before any batch: keeps NMS and records well-defined with no points."""
    return MaskBatch(
        iou_preds=torch.zeros(0, device=device),
        points=torch.zeros((0, 2), dtype=torch.float64),
        stability_score=torch.zeros(0, device=device),
        boxes=torch.zeros((0, 4), dtype=torch.long, device=device),
        rles=[],
    )


def _model_proposer(model: torch.nn.Module, top_k: int | None, score_threshold: float | None) -> PointProposer:
    """The model's own AutoPPN: proposals for the embedded crop, in the input frame, mapped
    back to crop pixels."""
    autoppn = getattr(model, "autoppn", None)
    if autoppn is None:
        raise SlimsegError("sampler='autoppn' needs a model with an AutoPPN (lite-sam, or one trained with "
                           "`slimseg train --stage autoppn`) or a point_proposer")
    top_k = autoppn.config.top_k if top_k is None else top_k
    score_threshold = autoppn.config.score_threshold if score_threshold is None else score_threshold

    def propose(crop: np.ndarray, predictor: Predictor) -> np.ndarray:
        logits = autoppn(predictor.get_image_embedding())
        proposals = propose_points(logits, top_k, score_threshold, model.img_size, predictor.input_size)[0]
        (input_h, input_w), (height, width) = predictor.input_size, predictor.original_size
        points = proposals.points.detach().cpu().double().numpy().reshape(-1, 2)
        return points * np.array([width / input_w, height / input_h])

    return propose
