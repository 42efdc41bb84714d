"""``slimseg segevery`` end to end on a tiny random model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.masks import decode_rle

runner = CliRunner()
# Random weights give low scores: thresholds that let masks through.
LOOSE = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "0.9"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return slimseg.save_model(random_tiny_model(11), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo(90, 120, seed=3)).save(folder / "a.png")
    Image.fromarray(photo(60, 80, seed=4)).save(folder / "b.jpg")
    return folder


def test_rle_output_matches_the_library(model_path, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(model_path), "--out", str(out), *LOOSE])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    records = json.loads((out / "a.json").read_text())
    assert line["masks"] == len(records) > 0 and line["sampler"] == "grid"
    generator = MaskGenerator(slimseg.load_model(model_path, device="cpu"), points_per_side=4, pred_iou_thresh=0,
                              stability_score_thresh=0, box_nms_thresh=0.9, output_mode="coco_rle")
    expected = generator.generate(np.asarray(Image.open(images / "a.png").convert("RGB")))
    assert [r["bbox"] for r in records] == [r["bbox"] for r in expected]
    assert decode_rle(records[0]["segmentation"]).shape == (90, 120)
    assert set(records[0]) >= {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                               "crop_box"}


def test_png_metadata_overlay_and_coco(model_path, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["segevery", str(images), "-m", str(model_path), "--out", str(out), "-f", "png",
                                 "--overlay", *LOOSE])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "a" / "metadata.csv").open()))
    assert len(rows) == json.loads(result.stdout.splitlines()[0])["masks"]
    assert set(np.unique(np.asarray(Image.open(out / "a" / "0.png")))) <= {0, 255}
    assert np.asarray(Image.open(out / "b.overlay.png")).shape == (60, 80, 3)
    result = runner.invoke(app, ["segevery", str(images), "-m", str(model_path), "--out", str(out), "-f", "coco",
                                 *LOOSE])
    coco = json.loads((out / "annotations.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [str(images / "a.png"), str(images / "b.jpg")]
    assert all(a["category_id"] == 1 and a["image_id"] in (1, 2) for a in coco["annotations"])


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["-f", "png"], "--out", 2),
        (["--overlay"], "--out", 2),
        (["--sampler", "autoppn"], "AutoPPN", 1),
        (["--pred-iou-thresh", "1.5"], "pred_iou_thresh", 1),
        (["--dtype", "int8"], "unknown dtype 'int8'", 2),
        (["--compile", "--backend", "onnx"], "--compile applies to --backend torch", 2),
    ],
)
def test_bad_input(model_path, images, args, fragment, code):
    result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(model_path), *args])
    assert result.exit_code == code, result.output
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_compiled_decoder_gives_the_eager_records(model_path, images, tmp_path):
    outputs = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"out{len(outputs)}"
        result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(model_path), "--out", str(out),
                                     *LOOSE, *extra])
        if extra and "torch.compile does not work on this machine" in result.stderr:
            pytest.skip(result.stderr.strip())
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((out / "a.json").read_text()))
    eager, compiled = outputs
    assert len(compiled) == len(eager) > 0
    assert [r["bbox"] for r in compiled] == [r["bbox"] for r in eager]
    assert [r["predicted_iou"] for r in compiled] == pytest.approx([r["predicted_iou"] for r in eager], abs=1e-4)
