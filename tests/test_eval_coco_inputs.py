"""``slimseg eval-coco`` refusing what would destroy the user's files or waste a model load:
an --out that is a file the command reads, a results folder that is not eval-coco's
(with --restart too), and SegEvery options out of range."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimseg.cli.app import app
from slimseg.data.synthetic_coco import write_coco_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")
runner = CliRunner()


@pytest.fixture(scope="module")
def coco_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco_folder(root, 2, seed=4)
    return root


@pytest.fixture
def inputs(coco_source, model_path, tmp_path) -> dict[str, Path]:
    """Copies of every input in tmp_path, so that a command that does overwrite one (the
    defect these tests catch) cannot spoil the shared fixtures for other tests."""
    coco = tmp_path / "coco"
    shutil.copytree(coco_source, coco)
    model = tmp_path / "model" / "tiny.safetensors"
    model.parent.mkdir()
    shutil.copy(model_path, model)
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(model_path, folder / "model.safetensors")
    annotations = coco / "annotations" / "instances_val2017.json"
    detections = tmp_path / "dets.json"
    detections.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"],
                                       "bbox": a["bbox"], "score": 0.5}
                                      for a in json.loads(annotations.read_text())["annotations"]]))
    return {"coco": coco, "model": model, "folder": folder, "annotations": annotations, "detections": detections}


def eval_coco(*options: str | Path):
    return runner.invoke(app, ["eval-coco", "--device", "cpu", *map(str, options)])


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["annotations", "model", "folder model", "detections", "image", "alias",
                                  "results folder holds an input", "results folder is an input"])
def test_out_that_is_a_file_the_command_reads_is_refused_before_any_work(inputs, tmp_path, case):
    coco, model = inputs["coco"], inputs["model"]
    prompt = ["--prompt", "box"]
    if case == "annotations":
        out = inputs["annotations"]
    elif case == "model":
        out = model
    elif case == "folder model":
        model, out = inputs["folder"], inputs["folder"] / "model.safetensors"
    elif case == "detections":
        prompt, out = ["--prompt", "detections", "--detections", inputs["detections"]], inputs["detections"]
    elif case == "image":
        out = coco / "val2017" / sorted(os.listdir(coco / "val2017"))[0]
    elif case == "alias":  # another spelling of the checkpoint: a symlink to it
        out = tmp_path / "link.safetensors"
        out.symlink_to(model)
    elif case == "results folder holds an input":
        (tmp_path / "r.images").mkdir()
        (tmp_path / "r.images" / "settings.json").write_text("{}")
        moved = tmp_path / "r.images" / "dets.json"
        inputs["detections"].rename(moved)
        prompt, out = ["--prompt", "detections", "--detections", moved, "--restart"], tmp_path / "r.json"
    else:  # --restart would have deleted the detections file named like the results folder
        moved = tmp_path / "r.images"
        inputs["detections"].rename(moved)
        prompt, out = ["--prompt", "detections", "--detections", moved, "--restart"], tmp_path / "r.json"
    before = _contents(tmp_path)
    result = eval_coco("--coco-root", coco, "--model", model, *prompt, "--out", out)
    assert result.exit_code == 2, (case, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a file that this command reads: write the output elsewhere" in lines[0], lines
    assert not result.stdout.strip()
    assert _contents(tmp_path) == before  # nothing replaced, no results folder left


def test_a_report_beside_the_weights_of_a_model_folder_may_be_replaced(inputs):
    """Only the files loading reads are protected: a rerun may replace its own report."""
    out = inputs["folder"] / "box.json"
    for _ in range(2):
        result = eval_coco("--coco-root", inputs["coco"], "--model", inputs["folder"], "--prompt", "box",
                           "--limit", "1", "--out", out, "--restart")
        assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["images"] == 1


def test_restart_discards_only_eval_coco_results(inputs, tmp_path):
    coco, model = inputs["coco"], inputs["model"]
    foreign = tmp_path / "foreign.images"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    for restart in ([], ["--restart"]):
        result = eval_coco("--coco-root", coco, "--model", model, "--prompt", "box", "--out",
                           tmp_path / "foreign.json", *restart)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == (f"slimseg: error: {foreign}: not an eval-coco results folder (no "
                                         "settings.json); remove it or choose another --out")
        assert (foreign / "notes.txt").read_text() == "hi" and not (tmp_path / "foreign.json").exists()
    # a file where the results folder goes is refused too, not deleted
    (tmp_path / "file.images").write_text("mine")
    result = eval_coco("--coco-root", coco, "--model", model, "--prompt", "box", "--out", tmp_path / "file.json",
                       "--restart")
    assert result.exit_code == 1 and "exists and is not a folder" in result.stderr
    assert (tmp_path / "file.images").read_text() == "mine"
    # eval-coco's own folder is restarted: its results go, a file the user added stays
    out = tmp_path / "own.json"
    assert eval_coco("--coco-root", coco, "--model", model, "--prompt", "box", "--out", out).exit_code == 0
    (tmp_path / "own.images" / "README").write_text("keep")
    result = eval_coco("--coco-root", coco, "--model", model, "--prompt", "point", "--out", out, "--restart")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_images"] == 0
    assert (tmp_path / "own.images" / "README").read_text() == "keep"
    assert json.loads((tmp_path / "own.images" / "settings.json").read_text())["prompt"] == "point"


@pytest.mark.parametrize("option, value, fragment", [
    ("--pred-iou-thresh", "nan", "--pred-iou-thresh must be a finite number in [0, 1], got nan"),
    ("--pred-iou-thresh", "2", "--pred-iou-thresh must be in [0, 1], got 2.0"),
    ("--stability-score-thresh", "1.5", "--stability-score-thresh must be in [0, 1], got 1.5"),
    ("--box-nms-thresh", "-1", "--box-nms-thresh must be in [0, 1], got -1.0"),
    ("--points-per-side", "5000", "--points-per-side"),
])
def test_segevery_options_are_checked_before_the_model_is_read(inputs, tmp_path, option, value, fragment):
    # a model that does not exist: an option checked after loading would report the model instead
    result = eval_coco("--coco-root", inputs["coco"], "--model", tmp_path / "absent.safetensors",
                       "--prompt", "everything", option, value, "--out", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and "absent" not in result.stderr and "_thresh" not in result.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.images").exists()
