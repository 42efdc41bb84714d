"""Image-folder and SA-1B datasets: encoder inputs equal to the model's, listing rules, bad files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slimseg
from conftest import photo, tiny_config
from slimseg.data.datasets import Annotation, ImageFolderDataset, SA1BDataset, collate_images
from slimseg.data.images import read_image
from slimseg.data.synthetic import write_image_folder, write_sa1b_folder
from slimseg.errors import SlimsegError
from slimseg.inference.masks import decode_rle
from slimseg.inference.transforms import ResizeLongestSide


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "slimseg.data" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(("height", "width"), [(48, 80), (90, 40), (64, 64)])
def test_item_matches_model_preprocess(tmp_path: Path, height: int, width: int) -> None:
    Image.fromarray(photo(height, width)).save(tmp_path / "a.png")
    model = slimseg.build_model(tiny_config())
    item = ImageFolderDataset(tmp_path, img_size=256)[0]
    rgb = read_image(tmp_path / "a.png")
    resized = ResizeLongestSide(256).apply_image(rgb)
    expected = model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())[0]
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (3, 256, 256)
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)
    assert item["original_size"] == (height, width)
    assert item["input_size"] == resized.shape[:2]
    assert max(item["input_size"]) == 256
    assert item["path"] == str(tmp_path / "a.png")


def test_listing_sorts_limits_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["b.jpg", "a.PNG", "c.jpeg", ".hidden.jpg", "notes.txt"]:
        Image.fromarray(photo(20, 24)).save(tmp_path / name, format="PNG")
    (tmp_path / "sub").mkdir()
    Image.fromarray(photo(20, 24)).save(tmp_path / "sub" / "d.png")
    dataset = ImageFolderDataset(tmp_path, img_size=64)
    assert [p.name for p in dataset.paths] == ["a.PNG", "b.jpg", "c.jpeg"]
    assert len(ImageFolderDataset(tmp_path, img_size=64, limit=2)) == 2
    assert [p.name for p in ImageFolderDataset(tmp_path, img_size=64, limit=2).paths] == ["a.PNG", "b.jpg"]


def test_recursive_listing_skips_hidden_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "x", 2, size=(20, 24))
    write_image_folder(tmp_path / "top", 1, size=(20, 24))
    write_image_folder(tmp_path / ".cache", 1, size=(20, 24))
    with pytest.raises(SlimsegError, match="no image files"):
        ImageFolderDataset(tmp_path)
    relative = [p.relative_to(tmp_path).as_posix() for p in ImageFolderDataset(tmp_path, recursive=True).paths]
    assert relative == ["top/img_000.jpg", "x/img_000.jpg", "x/img_001.jpg"]


def test_missing_and_empty_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SlimsegError, match="no such folder"):
        ImageFolderDataset(tmp_path / "absent")
    with pytest.raises(SlimsegError, match="no image files"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(SlimsegError, match="not a folder"):
        ImageFolderDataset(tmp_path / "file.jpg")
    with pytest.raises(SlimsegError, match="limit"):
        ImageFolderDataset(tmp_path, limit=0)


def test_corrupt_image_gives_none_and_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image_folder(tmp_path, 2, size=(20, 24))
    good = (tmp_path / "img_000.jpg").read_bytes()
    (tmp_path / "img_001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    dataset = ImageFolderDataset(tmp_path, img_size=64)
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        assert dataset[0] is not None
        assert dataset[1] is None
        assert dataset[1] is None
    records = _warnings(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "img_001.jpg" in message and "\n" not in message


def test_collate_drops_none_and_stacks(tmp_path: Path) -> None:
    write_image_folder(tmp_path, 2, size=(20, 24))
    dataset = ImageFolderDataset(tmp_path, img_size=32)
    batch = collate_images([dataset[0], None, dataset[1]])
    assert batch is not None
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["path"] == [str(p) for p in dataset.paths]
    assert batch["original_size"] == [(20, 24), (20, 24)]
    assert collate_images([None, None]) is None
    assert collate_images([]) is None
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_images)
    assert next(iter(loader))["image"].shape == (2, 3, 32, 32)


def test_collate_names_the_files_of_mixed_datasets(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "plain", 1, size=(20, 24))
    write_sa1b_folder(tmp_path / "sa1b", 1, size=(20, 24))
    plain = ImageFolderDataset(tmp_path / "plain", img_size=32)[0]
    annotated = SA1BDataset(tmp_path / "sa1b", img_size=32)[0]
    with pytest.raises(SlimsegError) as caught:
        collate_images([plain, annotated])
    message = str(caught.value)
    assert plain["path"] in message and annotated["path"] in message and "mixed kinds of dataset" in message
    assert "only one of them has annotations" in message, message


def test_synthetic_folder_is_deterministic(tmp_path: Path) -> None:
    first = write_sa1b_folder(tmp_path / "a", 2, seed=5)
    second = write_sa1b_folder(tmp_path / "b", 2, seed=5)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".json").read_text() == b.with_suffix(".json").read_text()
    other = write_sa1b_folder(tmp_path / "c", 1, seed=6)
    assert other[0].read_bytes() != first[0].read_bytes()


def test_sa1b_round_trip(tmp_path: Path) -> None:
    paths = write_sa1b_folder(tmp_path, 3, size=(60, 80), objects=3)
    assert [p.name for p in paths] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    dataset = SA1BDataset(tmp_path, img_size=64)
    assert len(dataset) == 3
    for path in paths:
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["image"] == {"image_id": int(path.stem[3:]), "width": 80, "height": 60, "file_name": path.name}
        item = dataset[dataset.paths.index(path)]
        assert item is not None and item["skipped_annotations"] == 0
        assert len(item["annotations"]) == len(record["annotations"]) == 3
        for annotation, raw in zip(item["annotations"], record["annotations"]):
            assert isinstance(annotation, Annotation)
            assert set(raw) == {"id", "segmentation", "bbox", "area", "predicted_iou", "point_coords",
                                "crop_box", "stability_score"}
            mask = annotation.decode()
            np.testing.assert_array_equal(mask, decode_rle(raw["segmentation"]))
            assert mask.shape == (60, 80) and mask.sum() == raw["area"] > 0
            x, y = annotation.point
            assert mask[int(y), int(x)], "the point prompt must lie inside its mask"
            ys, xs = np.nonzero(mask)
            assert annotation.bbox_xywh == (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())
        # Distinct shapes never overlap.
        masks = np.stack([a.decode() for a in item["annotations"]])
        assert masks.sum(axis=0).max() == 1
        # The drawn colours are really in the JPEG: each shape differs from the background.
        rgb = read_image(path)
        for mask in masks:
            assert np.abs(rgb[mask].mean(axis=0) - rgb[~masks.any(axis=0)].mean(axis=0)).max() > 30


def test_sa1b_skips_annotations_without_points(tmp_path: Path) -> None:
    (path,) = write_sa1b_folder(tmp_path, 1, objects=3)
    json_path = path.with_suffix(".json")
    record = json.loads(json_path.read_text())
    del record["annotations"][0]["point_coords"]
    record["annotations"][1]["point_coords"] = []
    json_path.write_text(json.dumps(record))
    item = SA1BDataset(tmp_path, img_size=64)[0]
    assert len(item["annotations"]) == 1 and item["skipped_annotations"] == 2


def test_sa1b_missing_and_malformed_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_sa1b_folder(tmp_path, 4, size=(32, 40), objects=1)
    paths[3].with_suffix(".json").unlink()  # images without JSON are not part of the dataset
    dataset = SA1BDataset(tmp_path, img_size=64)
    assert [p.name for p in dataset.paths] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    caplog.clear()  # the line about sa_4.jpg (see test_sa1b_images_without_json_get_one_line)
    paths[0].with_suffix(".json").write_text("{not json")
    paths[1].with_suffix(".json").unlink()
    bad_mask = json.loads(paths[2].with_suffix(".json").read_text())
    bad_mask["annotations"][0]["segmentation"]["size"] = [10, 10]
    paths[2].with_suffix(".json").write_text(json.dumps(bad_mask))
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        for _ in range(2):
            assert [dataset[i] for i in range(3)] == [None, None, None]
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert len(messages) == 3
    assert "sa_1.json" in messages[0] and "sa_2.json" in messages[1] and "missing" in messages[1]
    assert "sa_3.json" in messages[2] and "mask size" in messages[2]
    assert SA1BDataset(tmp_path, img_size=64, limit=1).paths == [paths[0]]


@pytest.mark.parametrize("breakage", ["no_list", "no_bbox", "bad_counts"])
def test_sa1b_schema_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str) -> None:
    (path,) = write_sa1b_folder(tmp_path, 1, objects=1)
    record = json.loads(path.with_suffix(".json").read_text())
    if breakage == "no_list":
        record = {"image": record["image"]}
    elif breakage == "no_bbox":
        del record["annotations"][0]["bbox"]
    else:
        record["annotations"][0]["segmentation"]["counts"] = 5
    path.with_suffix(".json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        assert SA1BDataset(tmp_path, img_size=64)[0] is None
    assert len(_warnings(caplog)) == 1


def test_folder_without_json_is_not_sa1b(tmp_path: Path) -> None:
    write_image_folder(tmp_path, 2, size=(20, 24))
    with pytest.raises(SlimsegError, match="not SA-1B layout"):
        SA1BDataset(tmp_path)


def test_sa1b_images_without_json_get_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_sa1b_folder(tmp_path, 5, size=(32, 40), objects=1)
    for path in paths[1:4]:
        path.with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        dataset = SA1BDataset(tmp_path, img_size=64)
        for index in range(len(dataset)):
            dataset[index]
    assert [p.name for p in dataset.paths] == ["sa_1.jpg", "sa_5.jpg"]
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert messages == [f"{tmp_path}: leaving out 3 of 5 images that have no sibling <name>.json annotation file "
                        "(e.g. sa_2.jpg)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        SA1BDataset(write_sa1b_folder(tmp_path / "complete", 2, size=(32, 40))[0].parent, img_size=64)
    assert _warnings(caplog) == []


def test_polygon_segmentation_is_named_as_unsupported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (path,) = write_sa1b_folder(tmp_path, 1, size=(32, 40), objects=1)
    record = json.loads(path.with_suffix(".json").read_text())
    record["annotations"][0]["segmentation"] = [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]]  # a COCO polygon
    path.with_suffix(".json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        assert SA1BDataset(tmp_path, img_size=64)[0] is None
    (message,) = [r.getMessage() for r in _warnings(caplog)]
    assert message.endswith("annotation 0 is malformed (segmentation is a polygon list, but it must be COCO RLE "
                            "{size, counts}: polygons are not supported)")


def test_a_folder_of_shards_hints_that_sub_folders_are_not_searched(tmp_path: Path) -> None:
    write_sa1b_folder(tmp_path / "sa_000020", 1, size=(32, 40))
    write_sa1b_folder(tmp_path / "sa_000021", 1, size=(32, 40))
    with pytest.raises(SlimsegError) as error:
        SA1BDataset(tmp_path, img_size=64)
    assert str(error.value) == (f"{tmp_path}: no image files in it (its 2 sub-folder(s), e.g. sa_000020, are not "
                                "searched: give one of them, or a folder that holds the images themselves)")
    assert len(ImageFolderDataset(tmp_path, img_size=64, recursive=True)) == 2
