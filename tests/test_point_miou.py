"""Point-prompt mIoU: the IoU itself, and batched evaluation equal to one prompt at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import slimseg
from conftest import random_tiny_model
from slimseg.data.datasets import SA1BDataset
from slimseg.data.images import read_image
from slimseg.data.synthetic import write_sa1b_folder
from slimseg.errors import SlimsegError
from slimseg.evaluation.point_miou import mask_iou, point_prompt_ious, point_prompt_miou


def _masks(*rects: tuple[int, int, int, int]) -> torch.Tensor:
    """(N, 8, 10) bool masks, one filled rectangle (y0, y1, x0, x1) each."""
    out = torch.zeros(len(rects), 8, 10, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        out[i, y0:y1, x0:x1] = True
    return out


def test_mask_iou_known_values() -> None:
    a = _masks((0, 4, 0, 4))[0]
    assert float(mask_iou(a, a)) == 1.0
    assert float(mask_iou(a, _masks((4, 8, 4, 8))[0])) == 0.0
    # Half of a 4x4 square overlaps another 4x4 square: 8 / (16 + 16 - 8).
    assert float(mask_iou(a, _masks((0, 4, 2, 6))[0])) == pytest.approx(8 / 24)
    # Nested: 4 of 16 pixels.
    assert float(mask_iou(_masks((0, 2, 0, 2))[0], a)) == pytest.approx(0.25)
    empty = torch.zeros(8, 10, dtype=torch.bool)
    assert float(mask_iou(empty, empty)) == 0.0
    assert float(mask_iou(empty, a)) == 0.0


def test_mask_iou_is_batched() -> None:
    pred = _masks((0, 4, 0, 4), (0, 4, 0, 4), (0, 8, 0, 10))
    target = _masks((0, 4, 0, 4), (4, 8, 4, 8), (0, 4, 0, 5))
    ious = mask_iou(pred, target)
    assert ious.shape == (3,) and ious.dtype == torch.float32
    torch.testing.assert_close(ious, torch.tensor([1.0, 0.0, 20 / 80]))


def _reference_ious(predictor: slimseg.Predictor, dataset: SA1BDataset) -> list[float]:
    """One ``predict`` call per annotation, IoU in numpy: independent of the batched code."""
    scores = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item is None or not item["annotations"]:
            continue
        predictor.set_image(read_image(item["path"]))
        per_mask = []
        for annotation in item["annotations"]:
            masks, _, _ = predictor.predict(
                point_coords=np.array([annotation.point]), point_labels=np.array([1]), multimask_output=False
            )
            pred, target = masks[0], annotation.decode()
            union = np.logical_or(pred, target).sum()
            per_mask.append(np.logical_and(pred, target).sum() / union if union else 0.0)
        scores.append(float(np.mean(per_mask)))
    return scores


@pytest.fixture(scope="module")
def predictor() -> slimseg.Predictor:
    # random weights, not the default initialisation: its nearly flat logits leave pixels within
    # 1e-5 of the mask threshold, which batched and one-at-a-time decoding may round apart
    return slimseg.Predictor(random_tiny_model(0))


def test_batched_miou_equals_one_prompt_at_a_time(tmp_path: Path, predictor: slimseg.Predictor) -> None:
    paths = write_sa1b_folder(tmp_path, 4, size=(72, 100), objects=3)
    # One image without annotations and one unreadable image: both are skipped.
    empty = json.loads(paths[1].with_suffix(".json").read_text())
    empty["annotations"] = []
    paths[1].with_suffix(".json").write_text(json.dumps(empty))
    paths[2].write_bytes(b"not a jpeg")
    dataset = SA1BDataset(tmp_path, img_size=256)

    expected = _reference_ious(predictor, dataset)
    assert len(expected) == 2
    ious = point_prompt_ious(predictor, dataset)
    assert ious == pytest.approx(expected, abs=1e-6)
    # Several decoder calls per image give the same scores as one.
    assert point_prompt_ious(predictor, dataset, points_per_batch=2) == pytest.approx(expected, abs=1e-6)

    miou = point_prompt_miou(predictor, dataset)
    assert 0.0 <= miou <= 1.0
    assert miou == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert point_prompt_miou(predictor, dataset, limit=1) == pytest.approx(expected[0], abs=1e-6)
    assert not predictor.is_image_set


def test_miou_without_scorable_images_is_an_error(tmp_path: Path, predictor: slimseg.Predictor) -> None:
    write_sa1b_folder(tmp_path, 2, objects=0)
    dataset = SA1BDataset(tmp_path, img_size=256)
    assert point_prompt_ious(predictor, dataset) == []
    with pytest.raises(SlimsegError, match="no readable image with annotations"):
        point_prompt_miou(predictor, dataset)
    with pytest.raises(SlimsegError, match="limit"):
        point_prompt_ious(predictor, dataset, limit=0)
