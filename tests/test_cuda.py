"""The CUDA paths against the CPU: the same model on both devices gives the same embeddings,
masks and SegEvery records; autocast precisions stay close; the bench and the CLI run there.

Skipped on machines without a CUDA GPU (CI has none); run them where there is one.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import photo, random_tiny_model
from typer.testing import CliRunner

import slimseg
from slimseg.benchmark import BenchSettings, run_bench
from slimseg.cli.app import app
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.masks import decode_rle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOOSE = dict(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=0.9,
             output_mode="coco_rle")
BOX = np.array([10, 20, 120, 100])


@pytest.fixture(autouse=True)
def _full_float32():
    """TF32 would round float32 products to 10-bit mantissas: compare true float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def models():
    cpu = random_tiny_model(3).eval()
    return cpu, copy.deepcopy(cpu).to("cuda")


def _box_prediction(model, dtype: str = "float32"):
    predictor = slimseg.Predictor(model, dtype=dtype)
    predictor.set_image(photo(120, 160, seed=1))
    masks, scores, logits = predictor.predict(box=BOX, multimask_output=True)
    return predictor.get_image_embedding().cpu(), masks, scores, logits


def test_predictor_on_cuda_matches_the_cpu(models):
    cpu, gpu = models
    embedding, masks, scores, logits = _box_prediction(cpu)
    gpu_embedding, gpu_masks, gpu_scores, gpu_logits = _box_prediction(gpu)
    torch.testing.assert_close(gpu_embedding, embedding, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gpu_logits, logits, atol=1e-3)
    np.testing.assert_allclose(gpu_scores, scores, atol=1e-4)
    assert (gpu_masks != masks).mean() < 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_precisions_stay_close_and_return_float32(models, dtype):
    _, gpu = models
    embedding, masks, scores, logits = _box_prediction(gpu)
    low_embedding, low_masks, low_scores, low_logits = _box_prediction(gpu, dtype)
    assert low_embedding.dtype == torch.float32 and low_logits.dtype == np.float32
    relative = float((low_embedding - embedding).abs().max() / embedding.abs().max())
    assert relative < 0.05, relative
    assert (low_masks != masks).mean() < 0.05
    assert np.abs(low_scores - scores).max() < 0.05


def test_batched_embeddings_on_cuda_match_one_at_a_time(models):
    _, gpu = models
    predictor = slimseg.Predictor(gpu)
    pictures = [photo(120, 160, seed=1), photo(200, 90, seed=2), photo(40, 50, seed=3)]
    for picture, embedding in zip(pictures, predictor.embed_images(pictures)):
        assert embedding.features.device.type == "cuda" and embedding.seconds > 0
        predictor.set_image(picture)
        torch.testing.assert_close(embedding.features, predictor.get_image_embedding(), atol=1e-4, rtol=1e-4)


def test_mask_generator_on_cuda_gives_the_cpu_records(models):
    cpu, gpu = models
    image = photo(96, 128, seed=5)
    want = MaskGenerator(cpu, **LOOSE).generate(image)
    got = MaskGenerator(gpu, **LOOSE).generate(image)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert np.abs(np.array(a["bbox"]) - np.array(b["bbox"])).max() <= 1
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-3)


def test_bench_on_cuda_reports_allocator_memory(models):
    _, gpu = models
    report = run_bench(gpu, BenchSettings(runs=2, warmup=1, prompts=8, segevery=True, points_per_side=4),
                       image=photo(90, 120))
    assert set(report.stages) == {"encoder", "decoder_batch", "box_prompt", "segevery_grid"}
    for stage in report.stages.values():
        assert stage.memory_kind == "cuda allocated" and stage.peak_memory_bytes > 0 and stage.median > 0
    assert report.machine["device"].startswith("cuda")


def test_cli_segment_on_cuda_gives_the_cpu_masks(models, tmp_path):
    from PIL import Image

    cpu, _ = models
    model_path = slimseg.save_model(cpu, tmp_path / "tiny.safetensors")
    image = tmp_path / "a.png"
    Image.fromarray(photo(120, 160, seed=1)).save(image)
    runner = CliRunner()
    lines = []
    for device in ("cpu", "cuda"):
        result = runner.invoke(app, ["segment", str(image), "-m", str(model_path), "-b", "10,20,120,100",
                                     "--device", device, "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        lines.append(json.loads(result.stdout))
    cpu_mask, gpu_mask = (decode_rle(line["masks"][0]["segmentation"]) for line in lines)
    assert (cpu_mask != gpu_mask).mean() < 1e-3
