"""Several images (or SegEvery crops) in one encoder pass: the same embeddings, masks and
records as one image at a time, in the library and with ``--batch-size`` on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.cli.batch import EmbeddedImages, for_each_image
from slimseg.cli.inputs import ImageInput
from slimseg.errors import SlimsegError
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.predictor import ImageEmbedding

runner = CliRunner()
LOOSE = dict(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=0.9)
LOOSE_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
              "--box-nms-thresh", "0.9"]
# Landscape, portrait and small: each is padded differently to the square input.
SIZES = [(120, 160), (200, 90), (40, 50)]


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(5).eval()


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (height, width) in enumerate(SIZES):
        Image.fromarray(photo(height, width, seed=index)).save(folder / f"{index}.png")
    return folder


def test_one_pass_embeds_each_image_as_set_image_does(model):
    predictor = slimseg.Predictor(model)
    pictures = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    batch = predictor.embed_images(pictures)
    assert not predictor.is_image_set  # embedding alone leaves the current image alone
    box = np.array([5, 5, 35, 30])
    for picture, embedding in zip(pictures, batch):
        predictor.set_image(picture)
        alone = predictor.get_image_embedding().clone()
        masks, scores, logits = predictor.predict(box=box, multimask_output=True)
        assert embedding.original_size == picture.shape[:2] and embedding.seconds > 0
        torch.testing.assert_close(embedding.features, alone, atol=1e-5, rtol=1e-5)
        predictor.set_embedding(embedding)
        batch_masks, batch_scores, batch_logits = predictor.predict(box=box, multimask_output=True)
        np.testing.assert_allclose(batch_logits, logits, atol=1e-4)
        np.testing.assert_allclose(batch_scores, scores, atol=1e-5)
        assert (batch_masks != masks).mean() < 1e-3
    assert predictor.embed_images([]) == []


def test_bgr_images_and_bad_inputs(model):
    predictor = slimseg.Predictor(model)
    picture = photo(60, 80)
    (rgb,) = predictor.embed_images([picture])
    (bgr,) = predictor.embed_images([picture[..., ::-1]], image_format="BGR")
    torch.testing.assert_close(rgb.features, bgr.features)
    with pytest.raises(SlimsegError, match="HxWx3 uint8"):
        predictor.embed_images([picture, picture[..., 0]])
    with pytest.raises(SlimsegError, match="the image is empty"):
        predictor.embed_images([np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(SlimsegError, match="the image is empty"):
        MaskGenerator(model).generate(np.zeros((4, 0, 3), np.uint8))
    with pytest.raises(SlimsegError, match="image_format"):
        predictor.embed_images([picture], image_format="RGBA")
    with pytest.raises(SlimsegError, match="expects an ImageEmbedding"):
        predictor.set_embedding(rgb.features)
    with pytest.raises(SlimsegError, match=r"\(1, C, h, w\)"):
        predictor.set_embedding(ImageEmbedding(torch.zeros(2, 8, 4, 4), (60, 80), (192, 256)))
    with pytest.raises(SlimsegError, match="1x3xHxW"):
        predictor.set_torch_image(torch.zeros(2, 3, 192, 256), (60, 80))


@pytest.mark.parametrize("crop_n_layers, encoder_batch_size", [(0, 3), (1, 3)])
def test_generator_records_do_not_depend_on_the_batching(model, crop_n_layers, encoder_batch_size):
    pictures = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    options = dict(LOOSE, crop_n_layers=crop_n_layers, output_mode="coco_rle")
    single = MaskGenerator(model, **options)
    expected = [single.generate(picture) for picture in pictures]
    batched = MaskGenerator(model, encoder_batch_size=encoder_batch_size, **options)
    embeddings = batched.embed(pictures)
    assert [len(e) for e in embeddings] == [5 if crop_n_layers else 1] * len(pictures)
    for picture, own, records in zip(pictures, embeddings, expected):
        ours = batched.generate(picture, own)
        assert [r["bbox"] for r in ours] == [r["bbox"] for r in records] and len(ours) > 0
        np.testing.assert_allclose([r["predicted_iou"] for r in ours], [r["predicted_iou"] for r in records], atol=1e-4)
        timings = batched.last_timings
        assert timings["encoder"] == pytest.approx(sum(e.seconds for e in own))
        assert timings["total"] >= timings["encoder"] + timings["decoder"]
    # one image's crops batched inside generate() give the same records as well
    assert [r["bbox"] for r in batched.generate(pictures[0])] == [r["bbox"] for r in expected[0]]


def test_generator_refuses_another_images_embeddings_and_a_bad_batch_size(model):
    generator = MaskGenerator(model, **LOOSE)
    small, large = photo(40, 50), photo(120, 160)
    with pytest.raises(SlimsegError, match="do not belong to this image"):
        generator.generate(large, generator.embed([small])[0])
    for bad in (0, 2.5, True):
        with pytest.raises(SlimsegError, match="encoder_batch_size must be an integer >= 1"):
            MaskGenerator(model, encoder_batch_size=bad)


def test_embedded_images_are_taken_in_order(tmp_path):
    inputs = [ImageInput(tmp_path / f"{i}.png", str(i)) for i in range(3)]
    for item in inputs:
        Image.fromarray(photo(20, 30)).save(item.path)
    calls = []
    embedded = EmbeddedImages(inputs, 2, lambda pixels: calls.append(len(pixels)) or list(range(len(pixels))))
    with pytest.raises(ValueError, match="in input order"):
        embedded.take(inputs[1])
    assert [embedded.take(item)[1] for item in inputs] == [0, 1, 0]
    assert calls == [2, 1]


def test_running_out_of_memory_stops_the_run_with_a_hint(tmp_path):
    inputs = [ImageInput(tmp_path / f"{i}.png", str(i)) for i in range(4)]
    for item in inputs:
        Image.fromarray(photo(20, 30)).save(item.path)

    def embed(pixels: list) -> list:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    processed = []

    def process(image: ImageInput) -> dict:
        processed.append(image)
        embedded.take(image)
        return {}

    embedded = EmbeddedImages(inputs, 2, embed)
    with pytest.raises(SlimsegError, match=r"out of memory embedding 2 image\(s\) at once \(try a smaller --batch-size\): "
                                           r"CUDA out of memory. Tried to allocate 2.00 GiB$"):
        for_each_image(inputs, "segmenting", process)
    assert processed == inputs[:1]  # the run stopped at the first failure


def _lines(result) -> list[dict]:
    assert "Traceback" not in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_segment_batch_size_gives_the_same_masks_and_a_bad_file_fails_alone(model, images, tmp_path):
    model_path = slimseg.save_model(model, tmp_path / "tiny.safetensors")
    (images / "1b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    base = ["segment", str(images), "-m", str(model_path), "-b", "2,3,30,35", "--device", "cpu"]
    single = runner.invoke(app, base)
    batched = runner.invoke(app, [*base, "--batch-size", "3"])
    for result in (single, batched):
        assert result.exit_code == 1 and "1b_broken.png" in result.stderr and "1 of 4 image(s) failed" in result.stderr
    ones, threes = _lines(single), _lines(batched)
    assert [r["image"] for r in threes] == [r["image"] for r in ones] and len(ones) == 3
    for one, three in zip(ones, threes):
        assert three["masks"][0]["segmentation"] == one["masks"][0]["segmentation"]
        assert three["masks"][0]["score"] == pytest.approx(one["masks"][0]["score"], abs=1e-4)


def test_segevery_batch_size_gives_the_same_records(model, images, tmp_path):
    model_path = slimseg.save_model(model, tmp_path / "tiny.safetensors")
    outputs = {}
    for size in ("1", "2"):
        out = tmp_path / f"out{size}"
        result = runner.invoke(app, ["segevery", str(images), "-m", str(model_path), "--out", str(out),
                                     "--batch-size", size, *LOOSE_ARGS])
        assert result.exit_code == 0, result.output
        assert [line["timings"]["encoder"] > 0 for line in _lines(result)] == [True] * len(SIZES)
        outputs[size] = [json.loads((out / f"{i}.json").read_text()) for i in range(len(SIZES))]
    for one, two in zip(outputs["1"], outputs["2"]):
        assert [r["bbox"] for r in two] == [r["bbox"] for r in one] and len(one) > 0


@pytest.mark.parametrize("command, prompts", [("segment", ["-b", "0,0,5,5"]), ("segevery", [])])
def test_batch_size_below_one_is_a_usage_error(model, images, tmp_path, command, prompts):
    model_path = slimseg.save_model(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    result = runner.invoke(app, [command, str(images), "-m", str(model_path), *prompts, "--out", str(out),
                                 "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
