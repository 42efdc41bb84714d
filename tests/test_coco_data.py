"""COCO layout reading, the synthetic COCO writer, and the library pieces of eval-coco that
run no model: oracle scoring, interior points, sharding and the resumable results store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pycocotools.coco import COCO

from slimseg.data.coco import annotation_mask, load_coco_split, load_detections
from slimseg.data.synthetic_coco import write_coco_folder
from slimseg.errors import SlimsegError
from slimseg.evaluation.coco import (
    ResultStore,
    area_range,
    average_recall,
    instance_records,
    miou_table,
    segm_ap,
    shard,
)
from slimseg.evaluation.coco.predict import interior_point
from slimseg.inference.masks import encode_rle

# pycocotools' decoder trips a numpy 2 deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_folder(root, 4, seed=1)
    return load_coco_split(root, "val2017")


def test_synthetic_folder_is_real_coco(coco):
    reference = COCO(str(coco.annotation_file))  # pycocotools reads it as COCO
    annotations = [a for anns in coco.annotations.values() for a in anns]
    assert len(reference.getAnnIds()) == len(annotations) > 8
    assert any(a["iscrowd"] and isinstance(a["segmentation"]["counts"], list) for a in annotations)
    assert all(isinstance(a["segmentation"], list) for a in annotations if not a["iscrowd"])
    assert {a["category_id"] for a in annotations} == {1, 3}
    assert {area_range(a["area"]) for a in annotations} >= {"small", "medium"}
    for image in coco.select():
        assert coco.image_path(image).read_bytes()[:2] == b"\xff\xd8"  # a JPEG
        for annotation in coco.annotations[image["id"]]:
            ours = annotation_mask(annotation, image["height"], image["width"])
            assert np.array_equal(ours, reference.annToMask(annotation).astype(bool))
            assert ours.sum() == annotation["area"]


def test_limit_takes_the_first_images_in_file_order(coco):
    assert [i["id"] for i in coco.select(2)] == [i["id"] for i in coco.images[:2]] == [100, 107]


def test_oracle_scores_perfectly(coco):
    images = coco.select()
    instances, results = [], []
    for image in images:
        gts = [a for a in coco.annotations[image["id"]] if not a["iscrowd"]]
        masks = np.stack([annotation_mask(a, image["height"], image["width"]) for a in gts])
        instances += instance_records(gts, masks, masks, np.ones(len(gts)), np.zeros((len(gts), 2)))
        results += [{"image_id": image["id"], "category_id": a["category_id"], "segmentation": encode_rle(m),
                     "score": 1.0} for a, m in zip(gts, masks)]
    table = miou_table(instances)
    assert table["miou"]["all"] == pytest.approx(100.0) and table["instances"]["all"] == len(instances)
    ground_truth = coco.ground_truth(i["id"] for i in images)
    recall = average_recall(ground_truth, results)
    assert recall["AR@10"] == recall["AR@100"] == recall["AR@1000"] == pytest.approx(1.0)
    assert segm_ap(ground_truth, results)["AP"] == pytest.approx(1.0)
    # A wrong category is a miss for AP but not for class-agnostic recall.
    swapped = [{**r, "category_id": 4 - r["category_id"]} for r in results]
    assert segm_ap(ground_truth, swapped)["AP"] < 0.5
    assert average_recall(ground_truth, swapped)["AR@1000"] == pytest.approx(1.0)


def test_area_ranges_follow_coco():
    assert [area_range(a) for a in (0, 1023, 1024, 9216, 9217)] == ["small", "small", "medium", "medium", "large"]


def test_interior_point_counts_the_image_border_as_boundary():
    mask = np.zeros((20, 40), bool)
    mask[:, :30] = True  # touches the top, bottom and left borders
    x, y = interior_point(mask)
    assert y in (9.0, 10.0) and 8 <= x <= 11  # without the border rule it would drift to x = 0


def test_shards_partition_the_images():
    items = list(range(11))
    shares = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == items and shares[1] == [1, 4, 7, 10]


def test_store_resumes_drops_torn_lines_and_refuses_other_settings(tmp_path):
    store = ResultStore(tmp_path / "r.images", {"prompt": "box"})
    store.check(restart=False)
    store.prepare(restart=False)
    store.open(0)
    store.append({"image_id": 1, "seconds": 0.1})
    store.close()
    part = tmp_path / "r.images" / "part-0.jsonl"
    part.write_text(part.read_text() + '{"image_id": 2, "sec')  # killed mid-write
    assert set(store.records()) == {1}
    store.open(0)
    store.append({"image_id": 2, "seconds": 0.2})
    store.close()
    assert [json.loads(line)["image_id"] for line in part.read_text().splitlines()] == [1, 2]
    other = ResultStore(tmp_path / "r.images", {"prompt": "point"})
    with pytest.raises(SlimsegError, match="different run .*prompt.*--restart"):
        other.check(restart=False)
    # prepare() alone (the Python example) must refuse too, and leave the old run's settings
    with pytest.raises(SlimsegError, match="different run .*prompt.*--restart"):
        other.prepare(restart=False)
    assert json.loads((tmp_path / "r.images" / "settings.json").read_text()) == {"prompt": "box"}
    other.check(restart=True)
    other.prepare(restart=True)
    assert other.records() == {}


def test_detections_are_checked_against_the_annotation_file(coco, tmp_path):
    good = tmp_path / "dets.json"
    good.write_text(json.dumps([{"image_id": 107, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.2},
                                {"image_id": 107, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9}]))
    grouped = load_detections(good, coco)
    assert [d["score"] for d in grouped[107]] == [0.9, 0.2]
    for content, reason in (([{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "image_id 5"),
                            ([{"image_id": 100, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1}], "category_id 2"),
                            ([{"image_id": 100, "category_id": 1, "score": 1}], "lacks"),
                            ([{"image_id": [100], "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}],
                             r"image_id \[100\]"),
                            ([{"image_id": 100, "category_id": True, "bbox": [0, 0, 1, 1], "score": 1}],
                             "category_id True"),
                            ([{"image_id": 100, "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}],
                             "score 'high'"),
                            ([{"image_id": 100, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 1}],
                             r"bbox \[0, 0, -1, 1\]"),
                            ({"annotations": []}, "expected a JSON list")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(SlimsegError, match=reason):
            load_detections(bad, coco)


def test_restart_refuses_a_folder_that_is_not_a_results_folder(tmp_path):
    foreign = tmp_path / "foreign.images"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    store = ResultStore(foreign, {"prompt": "box"})
    for restart in (False, True):
        with pytest.raises(SlimsegError, match="not an eval-coco results folder"):
            store.check(restart=restart)
        with pytest.raises(SlimsegError, match="not an eval-coco results folder"):
            store.prepare(restart=restart)
    assert (foreign / "notes.txt").read_text() == "hi"
    (tmp_path / "file.images").write_text("mine")
    with pytest.raises(SlimsegError, match="exists and is not a folder"):
        ResultStore(tmp_path / "file.images", {}).prepare(restart=True)
    assert (tmp_path / "file.images").read_text() == "mine"
    # an empty folder holds nothing to lose: it is used
    (tmp_path / "empty.images").mkdir()
    ResultStore(tmp_path / "empty.images", {"prompt": "box"}).prepare(restart=True)


def test_a_folder_left_by_a_run_killed_while_writing_its_settings_is_taken_over(tmp_path):
    folder = tmp_path / "r.images"
    folder.mkdir()
    (folder / ".settings.json.k1ll3d.tmp").write_text('{"prom')
    store = ResultStore(folder, {"prompt": "box"})
    store.check(restart=False)
    store.prepare(restart=False)
    assert sorted(p.name for p in folder.iterdir()) == ["settings.json"]


def test_restart_deletes_the_results_and_nothing_else(tmp_path):
    store = ResultStore(tmp_path / "r.images", {"prompt": "box"})
    store.prepare(restart=False)
    store.open(1)
    store.append({"image_id": 1, "seconds": 0.1})
    store.close()
    (tmp_path / "r.images" / "README").write_text("keep")
    other = ResultStore(tmp_path / "r.images", {"prompt": "point"})
    other.prepare(restart=True)
    assert other.records() == {} and (tmp_path / "r.images" / "README").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "r.images").iterdir()) == ["README", "settings.json"]


def test_layout_and_id_problems_name_the_cause(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SlimsegError, match=r"afile: is a file, not a folder \(expected COCO layout"):
        load_coco_split(tmp_path / "afile", "val2017")
    root = tmp_path / "coco"
    write_coco_folder(root, 2, seed=3)
    path = root / "annotations" / "instances_val2017.json"
    original = json.loads(path.read_text())
    data = json.loads(path.read_text())
    data["images"][1]["id"] = data["images"][0]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(SlimsegError, match=rf"image id {data['images'][0]['id']} appears more than once in 'images'"):
        load_coco_split(root, "val2017")
    data = json.loads(json.dumps(original))
    data["annotations"][3]["id"] = data["annotations"][1]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(SlimsegError, match=rf"annotation id {data['annotations'][1]['id']} appears more than once"):
        load_coco_split(root, "val2017")
    path.write_text(json.dumps(original))
    shutil.rmtree(root / "val2017")
    (root / "val2017").write_text("")
    with pytest.raises(SlimsegError, match="val2017: is a file, not an image folder"):
        load_coco_split(root, "val2017")
