"""The parts of ``MaskGenerator`` (NMS, stability score, RLE, boxes, crops, small regions,
the mask batch) against brute force, pycocotools and segment-anything's own helpers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from slimseg.errors import SlimsegError
from slimseg.inference.everything.boxes import batched_mask_to_box, batched_nms, is_box_near_crop_edge, nms
from slimseg.inference.everything.crops import build_all_layer_point_grids, generate_crop_boxes, nonempty_crop_boxes
from slimseg.inference.everything.data import MaskBatch, stability_score
from slimseg.inference.everything.rle import (
    area_from_rle,
    coco_encode_rle,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
)
from slimseg.inference.masks import decode_rle


def _sam_amg():
    """segment_anything.utils.amg (importable once conftest has provided torchvision)."""
    from segment_anything.utils import amg

    return amg



def _brute_force_nms(boxes: np.ndarray, scores: np.ndarray, categories: np.ndarray, threshold: float) -> list[int]:
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        # torchvision divides in float32 and compares with the threshold in float64, so an
        # IoU of exactly 3/10 (0.3000000119 in float32) counts as above 0.3.
        return float(np.float32(inter) / np.float32(union)) if union > 0 else float("nan")

    order = sorted(range(len(boxes)), key=lambda i: -scores[i])  # sorted() is stable
    kept: list[int] = []
    for i in order:
        if not any(categories[j] == categories[i] and iou(boxes[i], boxes[j]) > threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(3))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    count = 150
    corners = rng.integers(0, 60, (count, 2))
    boxes = np.concatenate([corners, corners + rng.integers(1, 40, (count, 2))], axis=1)
    boxes[::7] = boxes[3]  # exact duplicates
    scores = rng.integers(0, 20, count).astype(np.float32)  # many ties: order must be stable
    categories = rng.integers(0, 3, count)
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0):
        expected = _brute_force_nms(boxes, scores, np.zeros(count), threshold)
        assert nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores), threshold).tolist() == expected
        expected = _brute_force_nms(boxes, scores, categories, threshold)
        got = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(categories), threshold)
        assert got.tolist() == expected


def test_nms_suppresses_only_strictly_above_the_threshold():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 10]], dtype=torch.float)  # IoU 0.5, 1.0
    scores = torch.tensor([0.9, 0.8, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]
    assert nms(boxes, scores, 1.0).tolist() == [0, 2, 1]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []
    empty = torch.zeros((3, 4))  # 0/0 IoU: never suppressed, as in torchvision
    assert nms(empty, scores, 0.5).tolist() == [0, 2, 1]


def test_stability_score_is_segment_anythings():
    amg = _sam_amg()
    logits = torch.randn(6, 37, 53) * 2
    logits[2] = -5  # nothing above threshold - offset: 0 / 0
    ours = stability_score(logits, 0.0, 1.0)
    theirs = amg.calculate_stability_score(logits, 0.0, 1.0)
    undefined = theirs.isnan()
    assert torch.equal(ours.isnan(), undefined) and torch.equal(ours[~undefined], theirs[~undefined])
    inner, outer = (logits[0] > 1).sum().item(), (logits[0] > -1).sum().item()
    assert ours[0].item() == pytest.approx(inner / outer, rel=1e-6)


def _masks() -> torch.Tensor:
    rng = np.random.default_rng(5)
    masks = rng.random((6, 23, 31)) > 0.5
    masks[1] = False
    masks[2] = True
    masks[3, :, :] = False
    masks[3, 4:9, 7:20] = True
    masks[4] = False
    masks[4, 0, 0] = True
    return torch.from_numpy(masks)


def test_rle_round_trips_and_matches_pycocotools():
    amg = _sam_amg()
    masks = _masks()
    rles = mask_to_rle(masks)
    assert rles == amg.mask_to_rle_pytorch(masks)
    for mask, rle in zip(masks.numpy(), rles):
        assert rle["counts"][0] == 0 if mask[0, 0] else rle["counts"][0] > 0
        decoded = rle_to_mask(rle)
        assert decoded.flags.c_contiguous and np.array_equal(decoded, mask)
        assert area_from_rle(rle) == mask.sum()
        coco = coco_encode_rle(rle)
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert coco == {"size": expected["size"], "counts": expected["counts"].decode("utf-8")}
        assert np.array_equal(decode_rle(coco), mask)


def test_mask_boxes_and_crop_edges_are_segment_anythings():
    amg = _sam_amg()
    masks = _masks()
    assert torch.equal(batched_mask_to_box(masks), amg.batched_mask_to_box(masks))
    grouped = masks.reshape(2, 3, 23, 31)
    assert torch.equal(batched_mask_to_box(grouped), amg.batched_mask_to_box(grouped))
    boxes = torch.tensor([[0, 0, 10, 10], [25, 30, 80, 90], [5, 40, 60, 99], [30, 30, 35, 35]])
    for crop in ([0, 0, 100, 100], [20, 20, 100, 100], [0, 10, 70, 100]):
        assert torch.equal(is_box_near_crop_edge(boxes, crop, [0, 0, 100, 100]),
                           amg.is_box_near_crop_edge(boxes, crop, [0, 0, 100, 100]))


def test_crop_boxes_for_known_sizes():
    boxes, layers = generate_crop_boxes((200, 300), 1, 512 / 1500)
    # overlap = int(0.3413 * 200) = 68; tiles of ceil((68 + 300) / 2) = 184 by ceil((68 + 200) / 2) = 134
    assert boxes == [[0, 0, 300, 200], [0, 0, 184, 134], [0, 66, 184, 200], [116, 0, 300, 134], [116, 66, 300, 200]]
    assert layers == [0, 1, 1, 1, 1]
    amg = _sam_amg()
    for size in ((480, 640), (1024, 768), (37, 1000)):
        for n_layers in (0, 1, 2, 3):
            for ratio in (0.0, 512 / 1500, 0.5):
                assert generate_crop_boxes(size, n_layers, ratio) == amg.generate_crop_boxes(size, n_layers, ratio)
    for ours, theirs in zip(build_all_layer_point_grids(7, 2, 2), amg.build_all_layer_point_grids(7, 2, 2)):
        assert np.array_equal(ours, theirs)


def test_nonempty_crop_boxes_drop_only_the_empty_crops():
    # a 1 x 1 image tiles into 2 x 2 crops of which three have no pixels; large images have none
    boxes, layers = generate_crop_boxes((1, 1), 1, 512 / 1500)
    assert [0, 1, 1, 1] in boxes
    assert nonempty_crop_boxes((1, 1), 1, 512 / 1500) == ([[0, 0, 1, 1], [0, 0, 1, 1]], [0, 1])
    kept, kept_layers = nonempty_crop_boxes((3, 2), 2, 512 / 1500)
    assert all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in kept) and len(kept) == len(kept_layers)
    assert nonempty_crop_boxes((480, 640), 2, 512 / 1500) == generate_crop_boxes((480, 640), 2, 512 / 1500)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_is_segment_anythings(mode):
    amg = _sam_amg()
    rng = np.random.default_rng(11)
    for _ in range(5):
        mask = cv2.blur(rng.random((40, 50)), (3, 3)) > 0.55
        for area in (1, 5, 30, 3000):
            ours, changed = remove_small_regions(mask, area, mode)
            theirs, their_changed = amg.remove_small_regions(mask, area, mode)
            assert changed == their_changed and np.array_equal(ours, theirs)
    with pytest.raises(SlimsegError):
        remove_small_regions(mask, 5, "both")


def test_mask_batch_filters_and_extends_every_column():
    batch = MaskBatch(a=torch.arange(4), b=np.arange(4) * 10, c=["w", "x", "y", "z"])
    batch.filter(torch.tensor([True, False, True, True]))
    assert batch["a"].tolist() == [0, 2, 3] and batch["b"].tolist() == [0, 20, 30] and batch["c"] == ["w", "y", "z"]
    batch.filter(torch.tensor([2, 0]))
    assert batch["a"].tolist() == [3, 0] and batch["c"] == ["z", "w"]
    batch.extend(MaskBatch(a=torch.tensor([7]), b=np.array([70]), c=["q"]))
    assert len(batch) == 3 and batch["b"].tolist() == [30, 0, 70] and batch["c"] == ["z", "w", "q"]
    with pytest.raises(SlimsegError):
        batch["d"] = 5
