"""``slimseg segevery`` end to end on a tiny random model."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
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
    assert line["output"] == str(out / "a.json")
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
    assert coco["info"] == {"description": "slimseg segevery: masks of 2 of 2 image(s)", "complete": True}
    assert [image["file_name"] for image in coco["images"]] == [str(images / "a.png"), str(images / "b.jpg")]
    assert all(a["category_id"] == 1 and a["image_id"] in (1, 2) for a in coco["annotations"])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["output"], line["image_id"]) for line in lines] == [(str(out / "annotations.json"), 1),
                                                                      (str(out / "annotations.json"), 2)]


@pytest.mark.parametrize("fmt, first, second", [("rle", "a.json", "a_2.json"), ("png", "a", "a_2")])
def test_records_name_the_files_of_images_whose_names_collide(model_path, tmp_path, fmt, first, second):
    for folder, seed in (("one", 3), ("two", 4)):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo(40, 50, seed=seed)).save(tmp_path / folder / "a.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["segevery", str(tmp_path / "one"), str(tmp_path / "two"), "-m", str(model_path),
                                 "--out", str(out), "-f", fmt, "--overlay", *LOOSE])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["output"] for line in lines] == [str(out / first), str(out / second)]
    assert [line["overlay"] for line in lines] == [str(out / "a.overlay.png"), str(out / "a_2.overlay.png")]
    assert all(Path(line["output"]).exists() and Path(line["overlay"]).exists() for line in lines)


def test_null_separated_paths_from_stdin(model_path, images):
    (images / "a.png").rename(images / "new\nline.png")
    listing = f"{images / 'new'}\nline.png\0{images / 'b.jpg'}\0".encode()
    result = runner.invoke(app, ["segevery", "-", "-0", "-m", str(model_path), *LOOSE], input=listing)
    assert result.exit_code == 0, result.output
    assert [Path(json.loads(line)["image"]).name for line in result.stdout.splitlines()] == ["new\nline.png", "b.jpg"]


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["-f", "png"], "--out", 2),
        (["--overlay"], "--out", 2),
        (["--sampler", "autoppn"], "AutoPPN", 1),
        (["--pred-iou-thresh", "1.5"], "--pred-iou-thresh must be in [0, 1]", 2),
        (["--dtype", "int8"], "unknown dtype 'int8'", 2),
        (["--compile", "--backend", "onnx"], "--compile applies to --backend torch", 2),
        (["--null"], "--null applies to paths read from standard input", 2),
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


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--out", "{file}"], "--out {file} is a file: give a folder"),
        (["--out", "{file}", "-f", "coco"], "--out {file} is a file: give a folder"),
        (["--out", "{folder}", "-f", "coco"], "annotations.json is a folder: give a file name"),
        (["--points-per-side", "100000"], "--points-per-side"),
        (["--crop-n-layers", "20"], "--crop-n-layers"),
        (["--pred-iou-thresh", "1.5"], "--pred-iou-thresh must be in [0, 1], got 1.5"),
        (["--box-nms-thresh", "2"], "--box-nms-thresh must be in [0, 1]"),
        (["--crop-nms-thresh", "-1"], "--crop-nms-thresh must be in [0, 1]"),
        (["--crop-overlap-ratio", "1.5"], "--crop-overlap-ratio must be in [0, 1)"),
        (["--stability-score-thresh", "nan"], "--stability-score-thresh must be a finite number"),
        (["--stability-score-offset", "-5"], "--stability-score-offset must be >= 0"),
        (["--sampler", "bogus"], "--sampler"),
        (["--max-proposals", "8"], "--max-proposals and --proposal-thresh apply to --sampler autoppn"),
        (["--points-per-side", "4", "--crop-n-layers", "2", "--crop-n-points-downscale-factor", "4"],
         "--points-per-side 4 with --crop-n-points-downscale-factor 4 leaves no points in crop layer 2"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(images, tmp_path, args, fragment):
    """Exit 2 naming the option, with a model that does not exist: had the model been loaded
    first, the error would be about the model (exit 1); nothing reaches stdout."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "coco" / "annotations.json").mkdir(parents=True)
    names = {"file": str(tmp_path / "afile"), "folder": str(tmp_path / "coco")}
    args = [arg.format(**names) for arg in args]
    result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(tmp_path / "absent.safetensors"), *args])
    assert result.exit_code == 2, result.output
    assert fragment.format(**names) in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and (tmp_path / "afile").read_text() == "mine"


def test_help_names_the_samplers_and_bounds():
    result = runner.invoke(app, ["segevery", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "grid|autoppn" in result.stdout and "<str>" not in result.stdout
    assert "1<=x<=1024" in result.stdout and "0<=x<=4" in result.stdout


@pytest.mark.parametrize("height, width", [(1, 1), (3, 2)])
def test_crop_layers_on_an_image_a_few_pixels_wide(model_path, tmp_path, height, width):
    """Such images tile into crops of zero width or height, which are skipped."""
    path = tmp_path / "tiny.png"
    Image.fromarray(photo(height, width, seed=5)).save(path)
    result = runner.invoke(app, ["segevery", str(path), "-m", str(model_path), "--points-per-side", "2",
                                 "--crop-n-layers", "1", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["width"] == width


def test_png_rerun_removes_that_images_stale_masks_only(model_path, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(model_path), "--out", str(out),
                                 "-f", "png", *LOOSE])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["masks"]
    assert first > 2
    for name in ("00.png", "1.png.bak", "notes.txt"):  # not names segevery writes
        (out / "a" / name).write_text("the user's")
    result = runner.invoke(app, ["segevery", str(images / "a.png"), "-m", str(model_path), "--out", str(out),
                                 "-f", "png", "--points-per-side", "1", "--pred-iou-thresh", "0",
                                 "--stability-score-thresh", "0"])
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)["masks"]
    assert second < first
    rows = list(csv.DictReader((out / "a" / "metadata.csv").open()))
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted(
        [f"{n}.png" for n in range(len(rows))] + ["00.png", "1.png.bak", "metadata.csv", "notes.txt"])


@pytest.mark.parametrize("fmt", ["png", "coco"])
def test_sigterm_ends_the_run_with_one_line_and_no_temporary_files(model_path, images, tmp_path, fmt):
    many = tmp_path / "many"
    many.mkdir()
    for index in range(12):
        (many / f"{index:02d}.png").write_bytes((images / "a.png").read_bytes())
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "slimseg", "segevery", str(many), "-m", str(model_path),
                                "--device", "cpu", "--out", str(out), "-f", fmt, *LOOSE],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # one image done: the run is under way
    process.send_signal(signal.SIGTERM)
    rest, stderr = process.communicate(timeout=120)
    assert json.loads(first)["masks"] > 0
    assert process.returncode == 143 and stderr.strip() == "slimseg: error: terminated", stderr
    done = len((first + rest).splitlines())
    assert done < 12
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]
    if fmt == "coco":  # the images done, and a file that says it is partial
        coco = json.loads((out / "annotations.json").read_text())
        written = len(coco["images"])  # the signal may land after an image is added, before it is printed
        assert written in (done, done + 1) and coco["info"]["complete"] is False
        assert coco["info"]["description"].endswith(f"{written} of 12 image(s) (the run was interrupted)")
