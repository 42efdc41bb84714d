"""The measured stages of ``slimseg bench``: image encoder, decoder batch, one box prompt,
SegEvery per sampler. Each stage times warm-up + timed runs under its own memory peak."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slimseg.benchmark.memory import PeakMemory
from slimseg.benchmark.timing import Timing, time_runs
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.predictor import Predictor


@dataclass(frozen=True)
class StageResult:
    """One measured stage.

    ``rate`` is work per second (``rate_unit``: img/s, prompts/s); ``floor_seconds`` the
    time of the stage's arithmetic at the device's dense matmul rate (None where the stage is
    not pure model arithmetic); ``parts`` the median seconds of sub-stages (SegEvery's split);
    ``details`` plain JSON facts (prompts, masks).
    """

    label: str
    timing: Timing
    warmup: int
    peak_memory_bytes: int
    memory_kind: str
    rate: float
    rate_unit: str
    floor_seconds: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return self.timing.median

    @property
    def floor_fraction(self) -> float | None:
        """Floor / measured time: 1.0 would be every FLOP at the matmul rate."""
        return None if self.floor_seconds is None else self.floor_seconds / self.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "median_s": self.median,
            "seconds": list(self.timing.seconds),
            "runs": len(self.timing.seconds),
            "warmup": self.warmup,
            "rate": self.rate,
            "rate_unit": self.rate_unit,
            "floor_s": self.floor_seconds,
            "floor_fraction": self.floor_fraction,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_kind": self.memory_kind,
            "parts_median_s": dict(self.parts),
            **self.details,
        }


@dataclass(frozen=True)
class StagePlan:
    """How every stage is run: timed runs, warm-up runs, device."""

    device: torch.device
    runs: int
    warmup: int

    def measure(self, work: Callable[[], object]) -> tuple[Timing, PeakMemory]:
        with torch.inference_mode(), PeakMemory(self.device) as peak:
            timing = time_runs(work, self.device, self.runs, self.warmup)
        return timing, peak


def encoder_input(predictor: Predictor, image: np.ndarray) -> torch.Tensor:
    """The (1, 3, h, w) resized image (longest side img_size) that ``set_torch_image`` takes:
    the resize is a CPU image operation, left out of the encoder's time."""
    resized = predictor.transform.apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]


def point_batch(predictor: Predictor, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, 2) seeded XY points inside the resized image and their (B, 1) positive labels."""
    height, width = predictor.input_size
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(prompts, 1, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    return points.to(predictor.device), torch.ones(prompts, 1, dtype=torch.int, device=predictor.device)


def measure_encoder(plan: StagePlan, predictor: Predictor, image: np.ndarray, floor: float) -> StageResult:
    """Preprocessing (normalise, pad) and the image encoder on one image; leaves it set."""
    tensor = encoder_input(predictor, image)
    timing, peak = plan.measure(lambda: predictor.set_torch_image(tensor, image.shape[:2]))
    return StageResult("image encoder", timing, plan.warmup, peak.bytes, peak.kind, 1 / timing.median, "img/s",
                       floor_seconds=floor, details={"input": list(tensor.shape)})


def measure_encoder_batch(plan: StagePlan, predictor: Predictor, image: np.ndarray, batch: int,
                          floor: float) -> StageResult:
    """``batch`` copies of the image embedded in one encoder pass (``Predictor.embed_images``,
    resizing included); the rate is images per second."""
    images = [image] * batch
    timing, peak = plan.measure(lambda: predictor.embed_images(images))
    return StageResult(f"image encoder, batch of {batch}", timing, plan.warmup, peak.bytes, peak.kind,
                       batch / timing.median, "img/s", floor_seconds=batch * floor, details={"batch": batch})


def measure_decoder_batch(plan: StagePlan, predictor: Predictor, prompts: int, floor: float) -> StageResult:
    """``prompts`` single-point prompts decoded together (three low-res masks each), as
    SegEvery decodes its batches: prompt encoder and mask decoder, no upscaling."""
    points, labels = point_batch(predictor, prompts)
    timing, peak = plan.measure(lambda: predictor.predict_low_res(points, labels, multimask_output=True))
    return StageResult(f"decoder, {prompts} points", timing, plan.warmup, peak.bytes, peak.kind,
                       prompts / timing.median, "prompts/s", floor_seconds=floor, details={"prompts": prompts})


def measure_box_prompt(plan: StagePlan, predictor: Predictor, image: np.ndarray) -> StageResult:
    """One box prompt through ``Predictor.predict``: decoder, upscaling to the image size,
    thresholding and the copy to numpy - what an interactive click costs."""
    height, width = image.shape[:2]
    box = np.array([width / 4, height / 4, 3 * width / 4, 3 * height / 4])
    timing, peak = plan.measure(lambda: predictor.predict(box=box, multimask_output=False))
    return StageResult("box prompt", timing, plan.warmup, peak.bytes, peak.kind,
                       1 / timing.median, "prompts/s", details={"image": [height, width]})


def measure_segevery(plan: StagePlan, generator: MaskGenerator, image: np.ndarray, label: str) -> StageResult:
    """Seconds per image of ``generator.generate``, with the medians of its per-stage split
    (``MaskGenerator.last_timings``) and the number of masks of the last run."""
    splits: list[dict[str, float]] = []
    masks: list[int] = []

    def generate() -> None:
        masks.append(len(generator.generate(image)))
        splits.append(dict(generator.last_timings))

    timing, peak = plan.measure(generate)
    timed = splits[plan.warmup:]
    # the grid has no proposer stage; a 0 s row would only be noise in the table
    skip = {"total"} if generator.sampler == "autoppn" else {"total", "proposer"}
    parts = {name: statistics.median(split[name] for split in timed) for name in timed[0] if name not in skip}
    return StageResult(label, timing, plan.warmup, peak.bytes, peak.kind, 1 / timing.median, "img/s",
                       parts=parts, details={"masks": masks[-1], "image": list(image.shape[:2])})
