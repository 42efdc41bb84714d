"""``slimseg eval-coco`` end to end on a tiny random model and a COCO folder made here.

The reported numbers are checked against independent computations over the saved
per-image predictions: numpy IoUs for box/point mIoU, pycocotools run directly for AR/AP.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import random_tiny_model
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.data.synthetic_coco import write_coco_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")
runner = CliRunner()
IMAGES = 3
LOOSE = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return slimseg.save_model(random_tiny_model(11), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco_folder(root, IMAGES, seed=2)
    return root


def evaluate(coco_root: Path, model_path: Path, *options: str, expect: int = 0):
    result = runner.invoke(app, ["eval-coco", "--coco-root", str(coco_root), "--model", str(model_path),
                                 "--device", "cpu", *options])
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout) if expect == 0 else result


def saved_records(report: dict) -> list[dict]:
    folder = Path(report["per_image_results"])
    return [json.loads(line) for part in sorted(folder.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def direct_cocoeval(annotation_file: Path, results: list[dict], use_cats: bool, max_dets=None) -> np.ndarray:
    """pycocotools as its README runs it, on the same results."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.params.useCats = int(use_cats)
        if max_dets:
            evaluator.params.maxDets = max_dets
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_prompt_miou_equals_an_independent_computation(coco_root, model_path, tmp_path, prompt):
    report = evaluate(coco_root, model_path, "--prompt", prompt, "--out", str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["images"] == IMAGES and report["protocol"]["mask_selection"].startswith("multimask_output=True")
    assert "crowd" in report["protocol"]
    gt = quiet_coco(coco_root / "annotations" / "instances_val2017.json")
    ious = {"all": [], "small": [], "medium": [], "large": []}
    prompted = set()
    for record in saved_records(report):
        for instance in record["instances"]:
            annotation = gt.anns[instance["ann_id"]]
            truth = gt.annToMask(annotation).astype(bool)
            predicted = mask_utils.decode(instance["segmentation"]).astype(bool)
            iou = (truth & predicted).sum() / (truth | predicted).sum()
            assert instance["iou"] == pytest.approx(iou, abs=1e-6)
            area = annotation["area"]
            ious["all"].append(iou)
            ious["small" if area < 32**2 else "large" if area > 96**2 else "medium"].append(iou)
            prompted.add(instance["ann_id"])
            x, y, w, h = annotation["bbox"]
            if prompt == "box":
                assert instance["prompt"] == pytest.approx([x, y, x + w, y + h], abs=0.01)
            else:  # the most interior pixel, the border counting as boundary
                distance = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
                px, py = (int(v) for v in instance["prompt"])
                assert distance[py, px] == pytest.approx(distance.max(), abs=0.5)
    assert prompted == {a["id"] for a in gt.anns.values() if not a["iscrowd"]}  # every instance, no crowd
    for key, values in ious.items():
        expected = 100 * np.mean(values) if values else None
        assert report["metrics"]["miou"][key] == pytest.approx(expected, abs=1e-4)
        assert report["metrics"]["instances"][key] == len(values)


def test_everything_ar_equals_pycocotools_on_the_saved_results(coco_root, model_path, tmp_path):
    out = tmp_path / "report.json"
    first = evaluate(coco_root, model_path, "--prompt", "everything", *LOOSE, "--limit", "1", "--out", str(out))
    assert first["images"] == 1 and first["metrics"]["masks_per_image"] > 0
    # A random model finds nothing; slightly eroded ground truth from another "process" of the
    # same run makes recall non-trivial (and shows that every part is read on resume).
    gt = quiet_coco(coco_root / "annotations" / "instances_val2017.json")
    with (Path(first["per_image_results"]) / "part-5.jsonl").open("w") as part:
        for image_id in sorted(gt.imgs)[1:]:
            results = []
            for k, annotation in enumerate(gt.imgToAnns[image_id]):
                eroded = cv2.erode(gt.annToMask(annotation), np.ones((3, 3), np.uint8), iterations=1 + k % 4)
                rle = mask_utils.encode(np.asfortranarray(eroded))
                results.append({"image_id": image_id, "category_id": 1, "score": 0.1 * k,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            part.write(json.dumps({"image_id": image_id, "results": results, "seconds": 0.0}) + "\n")
    report = evaluate(coco_root, model_path, "--prompt", "everything", *LOOSE, "--out", str(out))
    assert report["resumed_images"] == IMAGES
    results = [r for record in saved_records(report) for r in record["results"]]
    stats = direct_cocoeval(coco_root / "annotations" / "instances_val2017.json", results, False, [10, 100, 1000])
    assert 0.1 < stats[8] < 1.0
    for index, key in ((6, "AR@10"), (7, "AR@100"), (8, "AR@1000")):
        assert report["metrics"][key] == pytest.approx(stats[index], abs=1e-9)
    assert report["protocol"]["scoring"].startswith("pycocotools COCOeval") and "useCats=0" in report["protocol"]["scoring"]
    assert report["settings"]["segevery"]["points_per_side"] == 4


def test_detections_ap_equals_pycocotools(coco_root, model_path, tmp_path):
    gt = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    detections = tmp_path / "dets.json"
    detections.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"],
                                       "bbox": a["bbox"], "score": 0.5 + 0.01 * a["id"]}
                                      for a in gt["annotations"] if not a["iscrowd"]]))
    report = evaluate(coco_root, model_path, "--prompt", "detections", "--detections", str(detections),
                      "--out", str(tmp_path / "r.json"))
    results = [r for record in saved_records(report) for r in record["results"]]
    assert len(results) == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    stats = direct_cocoeval(coco_root / "annotations" / "instances_val2017.json", results, True)
    assert report["metrics"]["AP"] == pytest.approx(stats[0], abs=1e-9)
    assert report["metrics"]["AP50"] == pytest.approx(stats[1], abs=1e-9)


def test_resume_computes_only_missing_images_and_gives_the_same_report(coco_root, model_path, tmp_path):
    out = tmp_path / "report.json"
    evaluate(coco_root, model_path, "--prompt", "box", "--limit", "2", "--out", str(out))
    part = tmp_path / "report.images" / "part-0.jsonl"
    part.write_text(part.read_text() + '{"image_id": 114, "instan')  # killed while writing image 3
    resumed = evaluate(coco_root, model_path, "--prompt", "box", "--out", str(out))
    assert resumed["resumed_images"] == 2 and resumed["images"] == IMAGES
    assert [json.loads(line)["image_id"] for line in part.read_text().splitlines()] == [100, 107, 114]
    fresh = evaluate(coco_root, model_path, "--prompt", "box", "--out", str(out), "--restart")
    assert fresh["resumed_images"] == 0
    assert fresh["metrics"]["miou"] == pytest.approx(resumed["metrics"]["miou"], abs=1e-9)
    # Other settings must not mix with these results.
    result = evaluate(coco_root, model_path, "--prompt", "point", "--out", str(out), expect=1)
    assert "different run" in result.stderr and "--restart" in result.stderr


def _broken_layouts(root: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: (arguments after eval-coco, a fragment of the one-line message)."""
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(root, target)
        return target

    no_split = copy("no_split")
    shutil.rmtree(no_split / "val2017")
    no_annotations = copy("no_annotations")
    (no_annotations / "annotations" / "instances_val2017.json").unlink()
    corrupt = copy("corrupt")
    (corrupt / "annotations" / "instances_val2017.json").write_text('{"images": [')
    not_coco = copy("not_coco")
    (not_coco / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    no_images = copy("no_images")
    (no_images / "val2017" / "000000000107.jpg").unlink()
    def broken(name: str, change) -> Path:
        target = copy(name)
        path = target / "annotations" / "instances_val2017.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return target

    null_area = broken("null_area", lambda d: d["annotations"][0].update(area=None))
    text_width = broken("text_width", lambda d: d["images"][0].update(width="abc"))
    rle = next(a for a in json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
               if isinstance(a["segmentation"], dict))
    rle_size = broken("rle_size", lambda d: next(a for a in d["annotations"] if a["id"] == rle["id"])
                      ["segmentation"].update(size=[10, 10]))
    wrong_size = broken("wrong_size", lambda d: d["images"][1].update(height=321))
    negative_box = broken("negative_box", lambda d: d["annotations"][0].update(bbox=[10, 10, -5, 20]))
    no_image = broken("no_image_listed", lambda d: d.update(images=[], annotations=[]))
    text_category = broken("text_category", lambda d: d["annotations"][0].update(category_id="person"))
    unknown_category = broken("unknown_category", lambda d: d["annotations"][0].update(category_id=77))
    bad_category_entry = broken("bad_category_entry", lambda d: d["categories"].append({"name": "no id"}))
    duplicate_image = broken("duplicate_image", lambda d: d["images"][1].update(id=d["images"][0]["id"]))
    a_file = tmp_path / "afile"
    a_file.write_text("")
    bad_dets = tmp_path / "dets.json"
    bad_dets.write_text('[{"image_id": 999, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 1}]')
    base = ["--prompt", "box"]
    return {
        "missing root": (["--coco-root", str(tmp_path / "nowhere"), *base], "no such folder"),
        "root is a file": (["--coco-root", str(a_file), *base], "afile: is a file, not a folder"),
        "duplicate image id": (["--coco-root", str(duplicate_image), *base], "image id 100 appears more than once"),
        "missing split": (["--coco-root", str(no_split), *base], "no such image folder"),
        "missing annotations": (["--coco-root", str(no_annotations), *base], "no such annotation file"),
        "corrupt annotations": (["--coco-root", str(corrupt), *base], "not valid JSON"),
        "not coco": (["--coco-root", str(not_coco), *base], "no 'annotations' list"),
        "missing images": (["--coco-root", str(no_images), *base], "1 of 3 image file(s)"),
        "missing detections": (["--coco-root", str(root), "--prompt", "detections", "--detections",
                                str(tmp_path / "none.json")], "no such file"),
        "bad detections": (["--coco-root", str(root), "--prompt", "detections", "--detections", str(bad_dets)],
                           "image_id 999"),
        "no detections": (["--coco-root", str(root), "--prompt", "detections"], "needs --detections"),
        "bad limit": (["--coco-root", str(root), *base, "--limit", "0"], "--limit 0"),
        "bad split": (["--coco-root", str(root), *base, "--split", "../val2017"], "--split"),
        "null area": (["--coco-root", str(null_area), *base], "has area None"),
        "text width": (["--coco-root", str(text_width), *base], "image 100 has width 'abc'"),
        "rle size": (["--coco-root", str(rle_size), *base], f"annotation {rle['id']} has RLE size [10, 10]"),
        "image size": (["--coco-root", str(wrong_size), *base], "image is 240x320 but"),
        "no images listed": (["--coco-root", str(no_image), *base], "lists no images"),
        "negative box": (["--coco-root", str(negative_box), *base], "has bbox [10, 10, -5, 20]"),
        "text category": (["--coco-root", str(text_category), *base], "has category_id 'person'"),
        "unknown category": (["--coco-root", str(unknown_category), *base], "has category_id 77"),
        "category without id": (["--coco-root", str(bad_category_entry), *base], "has no whole-number 'id'"),
        "bad sampler": (["--coco-root", str(root), "--prompt", "everything", "--sampler", "bogus"], "--sampler"),
    }


def test_bad_inputs_give_one_line_and_no_report(coco_root, model_path, tmp_path):
    for name, (arguments, fragment) in _broken_layouts(coco_root, tmp_path).items():
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval-coco", *arguments, "--model", str(model_path), "--device", "cpu",
                                     "--out", str(out)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code in (1, 2) and len(lines) == 1 and fragment in lines[0], (name, result.stderr)
        assert "internal error" not in lines[0], name
        assert not out.exists() and not result.stdout.strip(), name
        assert not out.with_suffix(".images").exists(), name
        if name == "bad sampler":
            assert result.exit_code == 2


def test_unwritable_out_is_refused_before_evaluating(coco_root, model_path, tmp_path):
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "file.txt").write_text("notes")
    for out, fragment in ((tmp_path / "folder.json", "is a folder: give a file name"),
                          (tmp_path / "file.txt" / "r.json", "is a file, not a folder")):
        result = evaluate(coco_root, model_path, "--prompt", "box", "--out", str(out), expect=2)
        assert fragment in result.stderr and "internal error" not in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.json"]


def test_no_detections_score_like_cocoeval(coco_root):
    """No results: 0 where a range has ground truth, -1 where it has none (as COCOeval says)."""
    from slimseg.data.coco import load_coco_split
    from slimseg.evaluation.coco.scoring import average_recall, segm_ap

    split = load_coco_split(coco_root, "val2017")
    small_only = {"images": [split.image(114)], "categories": split.categories,
                  "annotations": [dict(a) for a in split.annotations[114] if a["area"] < 32**2]}
    assert small_only["annotations"]
    path = coco_root.parent / "small_only.json"
    path.write_text(json.dumps(small_only))
    # a detection that matches nothing gives COCOeval's own numbers for "nothing found"
    miss = [{"image_id": 114, "category_id": 1, "score": 0.5,
             "segmentation": mask_utils.encode(np.asfortranarray(np.zeros((80, 106), np.uint8)))}]
    miss[0]["segmentation"]["counts"] = miss[0]["segmentation"]["counts"].decode()
    ap, ar = segm_ap(small_only, []), average_recall(small_only, [])
    assert list(ap.values()) == pytest.approx(direct_cocoeval(path, [dict(miss[0])], use_cats=True)[:6].tolist())
    assert list(ar.values()) == pytest.approx(
        direct_cocoeval(path, [dict(miss[0])], use_cats=False, max_dets=[10, 100, 1000])[6:12].tolist())
    assert ap["AP_small"] == 0.0 and ap["AP_large"] == -1.0


def test_torchrun_shards_images_and_merges(coco_root, model_path, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "report.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "slimseg", "eval-coco", "--coco-root",
         str(coco_root), "--model", str(model_path), "--prompt", "box", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["world_size"] == 2 and report["images"] == IMAGES
    folder = tmp_path / "report.images"
    assert [[json.loads(l)["image_id"] for l in (folder / f"part-{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)] == [[100, 114], [107]]
    single = evaluate(coco_root, model_path, "--prompt", "box", "--out", str(tmp_path / "single.json"))
    # one thread per rank against two in this process: matrix products may round apart, and a
    # pixel at the threshold move an IoU (mIoU in per cent) by ~1e-3
    assert report["metrics"]["miou"] == pytest.approx(single["metrics"]["miou"], abs=1e-2)


def test_python_api_refuses_bad_batch_and_prompt_kind(coco_root, model_path):
    from slimseg.data.coco import load_coco_split
    from slimseg.errors import SlimsegError
    from slimseg.evaluation.coco import CocoEvaluation, score_records

    split = load_coco_split(coco_root, "val2017")
    predictor = slimseg.Predictor(slimseg.load_model(model_path, device="cpu"))
    for batch in (0, -1, 2.5, "8"):
        with pytest.raises(SlimsegError, match=r"batch \(prompts per decoder call\) must be an integer >= 1"):
            CocoEvaluation(split, "box", predictor=predictor, batch=batch)
    with pytest.raises(SlimsegError, match="prompt 'boxes': choose one of box, point"):
        score_records(split, split.select(limit=1), {}, "boxes")
