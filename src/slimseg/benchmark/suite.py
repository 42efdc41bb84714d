"""``run_bench``: every stage of one model on one device, with the floor, as one report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from slimseg.benchmark.floor import MatmulRate, ModelWork, floor_seconds, matmul_rate, model_work
from slimseg.benchmark.machine import describe_machine
from slimseg.benchmark.stages import (
    StagePlan,
    StageResult,
    encoder_input,
    measure_box_prompt,
    measure_decoder_batch,
    measure_encoder,
    measure_encoder_batch,
    measure_segevery,
    point_batch,
)
from slimseg.benchmark.timing import check_runs
from slimseg.data.synthetic import synthetic_image
from slimseg.inference.compilation import compile_model, first_compiled_call
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.precision import dtype_name, parse_dtype
from slimseg.inference.predictor import Predictor
from slimseg.modeling.complexity import count_parameters
from slimseg.modeling.sam.image_encoder import Attention
from slimseg.validation import as_integer

# The image SegEvery and the box prompt run on when none is given: photo-sized, with shapes.
DEFAULT_IMAGE_SIZE = (768, 1024)


@dataclass(frozen=True)
class BenchSettings:
    """What ``run_bench`` measures and how; ``check()`` rejects impossible values."""

    runs: int = 5
    warmup: int = 1
    prompts: int = 64
    segevery: bool = True
    points_per_side: int = 32
    dtype: str = "float32"
    compile: bool = False
    batch_size: int = 1

    def check(self) -> None:
        parse_dtype(self.dtype)
        check_runs(self.runs, self.warmup)
        for name in ("batch_size", "prompts", "points_per_side"):
            as_integer(getattr(self, name), name, 1)

    @property
    def effective_warmup(self) -> int:
        # compilation happens on the first call of each shape and must not be timed
        return max(self.warmup, 1) if self.compile else self.warmup


@dataclass(frozen=True)
class BenchReport:
    """The machine, the model's work, the matmul rate and every stage, keyed by stage id
    (encoder, encoder_batch, decoder_batch, box_prompt, segevery_grid, segevery_autoppn)."""

    machine: dict[str, Any]
    model: dict[str, Any]
    settings: BenchSettings
    matmul: MatmulRate
    stages: dict[str, StageResult]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "model": self.model, "settings": asdict(self.settings),
                "matmul": asdict(self.matmul), "stages": {key: stage.to_dict() for key, stage in self.stages.items()}}


def has_autoppn(model: torch.nn.Module) -> bool:
    return getattr(model, "autoppn", None) is not None


def run_bench(
    model: torch.nn.Module,
    settings: BenchSettings | None = None,
    image: np.ndarray | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure ``model`` (a slimseg SAM or Lite-SAM, on its device) stage by stage.

    Arguments:
        image: HxWx3 uint8 RGB for the encoder, box prompt and SegEvery; by default a
            generated 768x1024 image with shapes (the same every time).
        on_stage: called with a one-line description before each stage (progress display).
    With ``settings.compile`` the model's encoder and decoder are replaced by compiled
    wrappers (the caller's model is changed).
    """
    settings = settings if settings is not None else BenchSettings()
    settings.check()
    announce = on_stage if on_stage is not None else (lambda description: None)
    dtype = parse_dtype(settings.dtype)
    device = model.device
    image = synthetic_image(DEFAULT_IMAGE_SIZE, seed=0, objects=8) if image is None else image

    announce(f"measuring the dense matmul rate ({dtype_name(dtype)})")
    rate = matmul_rate(device, dtype)
    work = model_work(model.config, settings.prompts)
    predictor = Predictor(model, dtype=dtype)
    if settings.compile:
        announce("compiling the image encoder and mask decoder")
        compile_model(model)
        first_compiled_call(lambda: _encode_and_decode(predictor, image, settings.prompts))
    plan = StagePlan(device, settings.runs, settings.effective_warmup)
    runs = f"{plan.warmup} warm-up + {plan.runs} timed run(s)"

    stages: dict[str, StageResult] = {}
    announce(f"image encoder: {runs}")
    encoder_floor = floor_seconds(work.encoder_macs, rate)
    stages["encoder"] = measure_encoder(plan, predictor, image, encoder_floor)
    if settings.batch_size > 1:
        announce(f"image encoder, batch of {settings.batch_size}: {runs}")
        # embed_images leaves the image set by the encoder stage current for the next stages
        stages["encoder_batch"] = measure_encoder_batch(plan, predictor, image, settings.batch_size, encoder_floor)
    announce(f"decoder, batch of {settings.prompts} point prompts: {runs}")
    stages["decoder_batch"] = measure_decoder_batch(plan, predictor, settings.prompts,
                                                    floor_seconds(work.decoder_macs, rate))
    announce(f"one box prompt: {runs}")
    stages["box_prompt"] = measure_box_prompt(plan, predictor, image)
    if settings.segevery:
        side = settings.points_per_side
        samplers = {"grid": dict(sampler="grid", points_per_side=side)}
        if has_autoppn(model):
            samplers["autoppn"] = dict(sampler="autoppn")
        for name, options in samplers.items():
            label = f"SegEvery grid {side}x{side}" if name == "grid" else "SegEvery AutoPPN"
            announce(f"{label}: {runs}")
            generator = MaskGenerator(model, output_mode="coco_rle", dtype=dtype, **options)
            stages[f"segevery_{name}"] = measure_segevery(plan, generator, image, label)
    machine = describe_machine(device, dtype, rel_pos_attention=has_rel_pos_attention(model))
    return BenchReport(machine, _model_facts(model, work), settings, rate, stages)


def _encode_and_decode(predictor: Predictor, image: np.ndarray, prompts: int) -> None:
    predictor.set_torch_image(encoder_input(predictor, image), image.shape[:2])
    predictor.predict_low_res(*point_batch(predictor, prompts), multimask_output=True)


def has_rel_pos_attention(model: torch.nn.Module) -> bool:
    """Whether the model's image encoder attends with decomposed relative positions (the
    SAM family), the attention that the native CPU kernel runs."""
    return any(isinstance(module, Attention) and module.use_rel_pos for module in model.modules())


def _model_facts(model: torch.nn.Module, work: ModelWork) -> dict[str, Any]:
    return {
        "family": model.config.to_dict().get("family", "sam"),
        "img_size": model.img_size,
        "parameters": count_parameters(model),
        "autoppn": has_autoppn(model),
        "encoder_macs": work.encoder_macs,
        "decoder_macs": work.decoder_macs,
        "decoder_prompts": work.prompts,
    }
