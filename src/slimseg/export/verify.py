"""Run exported graphs in onnxruntime on fixed cases and compare them with the torch modules.

The difference reported per case and output is ``max_abs`` (largest absolute difference) and
``rel`` = max_abs / max |torch output|, a scale-free measure that works for embeddings and
for mask logits of any magnitude. Tolerances on ``rel``: 1e-3 for float32 graphs, 2e-2 for
float16 ones (10 mantissa bits, accumulated over a ViT). int8 graphs are not held to a
tolerance: their masks are compared with the float32 ones by IoU and must only pass a sanity
floor (see ``INT8_IOU_FLOOR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimseg.errors import SlimsegError
from slimseg.export.graphs import DecoderGraph, EncoderGraph, AutoPPNGraph, LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT
from slimseg.export.runtime import GraphRunner
from slimseg.inference.transforms import ResizeLongestSide
from slimseg.modeling.sam.sam import PromptableSegmenter

TOLERANCE = {"float32": 1e-3, "float16": 2e-2}
# int8 masks of the decoder cases must overlap the float32 ones at least this much on average;
# below it the quantised model is broken, not merely less accurate.
INT8_IOU_FLOOR = 0.5
ORIGINAL_SIZE = (600, 800)  # (H, W) of the verification image: landscape, not a multiple of 16


@dataclass
class Verification:
    """Differences per ``case/output`` for each variant, and int8 mask IoU when quantised."""

    diffs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    int8_mask_iou: float | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"tolerance_rel": TOLERANCE, "diffs": self.diffs}
        if self.int8_mask_iou is not None:
            result["int8_mask_iou"] = self.int8_mask_iou
            result["int8_mask_iou_floor"] = INT8_IOU_FLOOR
        return result


def _image(seed: int) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 picture: noise would give untypically flat embeddings."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (ORIGINAL_SIZE[0] // 40, ORIGINAL_SIZE[1] // 40, 3), dtype=np.uint8)
    from PIL import Image

    return np.array(Image.fromarray(small).resize(ORIGINAL_SIZE[::-1], Image.Resampling.BICUBIC))


def _boxes(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    corners = rng.uniform(0, size * 0.7, (count, 2))
    return np.concatenate([corners, corners + rng.uniform(size * 0.1, size * 0.3, (count, 2))], axis=1)


def decoder_cases(model: PromptableSegmenter, embedding: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """ONNX decoder inputs for: 1 box, 16 boxes, points with -1 padding, a box with mask input."""
    rng = np.random.default_rng(0)
    transform = ResizeLongestSide(model.img_size)
    orig = np.array(ORIGINAL_SIZE, dtype=np.float32)
    mask_h, mask_w = model.prompt_encoder.mask_input_size
    no_mask = {"mask_input": np.zeros((1, 1, mask_h, mask_w), np.float32),
               "has_mask_input": np.zeros(1, np.float32)}

    def box_inputs(count: int) -> dict[str, np.ndarray]:
        boxes = transform.apply_boxes(_boxes(count, min(ORIGINAL_SIZE), rng), ORIGINAL_SIZE)
        labels = np.tile([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], (count, 1))
        return {"point_coords": boxes.reshape(-1, 2, 2), "point_labels": labels}

    # three prompts of 1, 2 and 3 points, each padded with -1 labels to 4 points
    points = transform.apply_coords(rng.uniform(0, min(ORIGINAL_SIZE), (3, 4, 2)), ORIGINAL_SIZE)
    labels = np.array([[1, -1, -1, -1], [1, 0, -1, -1], [1, 1, 0, -1]])
    cases = {
        "1_box": box_inputs(1),
        "16_boxes": box_inputs(16),
        "points_padded": {"point_coords": points * (labels[..., None] >= 0), "point_labels": labels},
        "mask_input": {**box_inputs(1), "mask_input": rng.normal(0, 4, (1, 1, mask_h, mask_w)),
                       "has_mask_input": np.ones(1)},
    }
    order = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
    return {
        name: {key: np.asarray({"image_embeddings": embedding, **no_mask, **case, "orig_im_size": orig}[key], np.float32)
               for key in order}
        for name, case in cases.items()
    }


def _compare(outputs: list[np.ndarray], reference: tuple[torch.Tensor, ...], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    diffs = {}
    for name, got, want in zip(names, outputs, reference):
        want = want.detach().float().numpy()
        if got.shape != want.shape:
            raise SlimsegError(f"onnxruntime gave {name} of shape {got.shape}, torch {want.shape}")
        if not np.all(np.isfinite(got)):
            raise SlimsegError(f"onnxruntime gave non-finite values in {name}")
        max_abs = float(np.abs(got.astype(np.float64) - want).max())
        diffs[name] = {"max_abs": max_abs, "rel": max_abs / max(float(np.abs(want).max()), 1e-12)}
    return diffs


def _torch_run(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The module on ``inputs``, given positionally in the graph's input order."""
    with torch.no_grad():
        result = module(*(torch.from_numpy(np.asarray(v)) for v in inputs.values()))
    return result if isinstance(result, tuple) else (result,)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def verify_export(
    model: PromptableSegmenter, folder: Path, files: dict[str, dict[str, str]], uint8_input: bool
) -> Verification:
    """Compare every variant in ``files`` ({variant: {graph: file name}}) with torch; raise
    SlimsegError naming the case when a float variant is past its tolerance."""
    transform = ResizeLongestSide(model.img_size)
    resized = np.stack([transform.apply_image(_image(seed)) for seed in (0, 1)]).transpose(0, 3, 1, 2)
    if uint8_input:
        images = np.ascontiguousarray(resized)
    else:
        with torch.no_grad():
            images = model.preprocess(torch.from_numpy(resized).float()).numpy()
    encoder_ref = _torch_run(EncoderGraph(model, uint8_input), {"image": images})
    embedding = encoder_ref[0][:1].numpy()
    cases = decoder_cases(model, embedding)
    decoder = DecoderGraph(model)
    references = {name: _torch_run(decoder, inputs) for name, inputs in cases.items()}
    result = Verification()
    for variant, graphs in files.items():
        diffs: dict[str, dict[str, float]] = {}
        encoder = GraphRunner(folder / graphs["image_encoder"])
        diffs["encoder_batch2"] = _compare(encoder.run({"image": images}), encoder_ref, ("image_embeddings",))
        runner = GraphRunner(folder / graphs["decoder"])
        outputs = {name: runner.run(inputs) for name, inputs in cases.items()}
        for name in cases:
            diffs[name] = _compare(outputs[name], references[name], ("masks", "iou_predictions", "low_res_masks"))
        if "autoppn" in graphs:
            embeddings = {"image_embeddings": encoder_ref[0].numpy()}
            reference = _torch_run(AutoPPNGraph(model), embeddings)
            diffs["autoppn"] = _compare(GraphRunner(folder / graphs["autoppn"]).run(embeddings), reference,
                                        ("heatmap_logits",))
        result.diffs[variant] = diffs
        if variant == "int8":
            # the whole int8 pipeline: its own embedding feeds its own decoder
            own = encoder.run({"image": images})[0][:1]
            ious = [_mask_iou(runner.run({**inputs, "image_embeddings": own})[0], references[name][0].numpy())
                    for name, inputs in cases.items()]
            result.int8_mask_iou = float(np.mean(ious))
            if not result.int8_mask_iou >= INT8_IOU_FLOOR:
                raise SlimsegError(f"int8 export is broken: mean mask IoU {result.int8_mask_iou:.3f} against float32 "
                                   f"is below the sanity floor {INT8_IOU_FLOOR}")
        elif variant in TOLERANCE:
            for case, outputs_diff in diffs.items():
                for output, diff in outputs_diff.items():
                    if diff["rel"] > TOLERANCE[variant]:
                        raise SlimsegError(
                            f"{variant} export failed verification: {case}/{output} differs from torch by "
                            f"{diff['rel']:.2e} relative (max abs {diff['max_abs']:.2e}), tolerance {TOLERANCE[variant]:.0e}"
                        )
    return result
