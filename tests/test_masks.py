"""Mask records: RLE round trips and boxes that agree with segment-anything's own code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from slimseg.errors import SlimsegError
from slimseg.inference.masks import decode_rle, encode_rle, mask_record, mask_to_box_xywh


def _load_sam_amg() -> ModuleType:
    """segment_anything/utils/amg.py, loaded from its file.

    ``import segment_anything`` pulls in torchvision through the package __init__;
    the amg module itself only needs numpy and torch.
    """
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed")
    amg_path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "amg.py"
    amg_spec = importlib.util.spec_from_file_location("_sam_amg_for_tests", amg_path)
    assert amg_spec is not None and amg_spec.loader is not None
    module = importlib.util.module_from_spec(amg_spec)
    amg_spec.loader.exec_module(module)
    return module


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    masks = [rng.random((37, 53)) > 0.6 for _ in range(5)]
    blob = np.zeros((37, 53), bool)
    blob[5:20, 11:40] = True
    single = np.zeros((37, 53), bool)
    single[36, 52] = True
    edges = np.zeros((37, 53), bool)
    edges[0, :] = True
    edges[:, 0] = True
    return [*masks, blob, single, edges, np.zeros((37, 53), bool), np.ones((37, 53), bool)]


@pytest.mark.parametrize("index", range(10))
def test_rle_round_trip(index: int) -> None:
    mask = _random_masks()[index]
    rle = encode_rle(mask)
    assert rle["size"] == [37, 53]
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # must be serialisable as is
    decoded = decode_rle(rle)
    assert decoded.dtype == bool
    assert decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.filterwarnings("ignore:.*copy keyword:DeprecationWarning")
def test_rle_matches_pycocotools_area_and_decoding() -> None:
    for mask in _random_masks():
        rle = encode_rle(mask)
        coco = {"size": rle["size"], "counts": rle["counts"].encode("utf-8")}
        assert int(mask_utils.area(coco)) == int(mask.sum())
        np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)


def test_encode_accepts_non_bool_and_c_ordered_input() -> None:
    mask = np.zeros((6, 9), np.uint8)
    mask[1:3, 2:7] = 7
    rle = encode_rle(mask)
    np.testing.assert_array_equal(decode_rle(rle), mask > 0)
    # A transposed view is not C-contiguous; the encoder must still read it correctly.
    np.testing.assert_array_equal(decode_rle(encode_rle(mask.T)), mask.T > 0)


def test_encode_matches_segment_anything_rle() -> None:
    torch = pytest.importorskip("torch")
    amg = _load_sam_amg()
    masks = _random_masks()
    theirs = amg.mask_to_rle_pytorch(torch.from_numpy(np.stack(masks)))
    for mask, uncompressed in zip(masks, theirs):
        assert encode_rle(mask) == amg.coco_encode_rle(uncompressed)


def test_decode_accepts_bytes_counts_and_uncompressed_lists() -> None:
    mask = _random_masks()[0]
    rle = encode_rle(mask)
    np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    # Uncompressed RLE: run lengths in column-major order, starting with a run of zeros.
    tiny = np.array([[0, 1], [1, 1]], bool)
    np.testing.assert_array_equal(decode_rle({"size": [2, 2], "counts": [1, 3]}), tiny)


@pytest.mark.parametrize(
    "bad",
    [{}, {"size": [2, 2]}, {"counts": "abc"}, {"size": "x", "counts": "0"}, {"size": [2, 2], "counts": 5}],
)
def test_decode_rejects_malformed_rle(bad: dict) -> None:
    with pytest.raises(SlimsegError, match="invalid RLE"):
        decode_rle(bad)


def test_box_matches_segment_anything() -> None:
    torch = pytest.importorskip("torch")
    amg = _load_sam_amg()
    for mask in _random_masks():
        theirs = amg.box_xyxy_to_xywh(amg.batched_mask_to_box(torch.from_numpy(mask))).tolist()
        assert mask_to_box_xywh(mask) == [int(v) for v in theirs]


def test_box_convention_by_hand() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert mask_to_box_xywh(mask) == [3, 2, 5, 2]
    one = np.zeros((4, 4), bool)
    one[1, 2] = True
    assert mask_to_box_xywh(one) == [2, 1, 0, 0]
    assert mask_to_box_xywh(np.zeros((4, 4), bool)) == [0, 0, 0, 0]
    assert all(type(v) is int for v in mask_to_box_xywh(mask))


def test_mask_record() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    record = mask_record(mask, np.float32(0.8765432), point_coords=[[4.0, 3.0]], stability_score=0.9)
    assert set(record) == {"segmentation", "area", "bbox", "score", "point_coords", "stability_score"}
    assert record["area"] == 18 and type(record["area"]) is int
    assert record["bbox"] == [3, 2, 5, 2]
    assert type(record["score"]) is float
    assert record["score"] == pytest.approx(0.8765432, rel=1e-7)
    assert record["score"] != round(record["score"], 3)  # not rounded
    assert record["point_coords"] == [[4.0, 3.0]]
    np.testing.assert_array_equal(decode_rle(record["segmentation"]), mask)
    json.dumps(record)


def test_mask_record_refuses_to_overwrite_its_own_keys() -> None:
    with pytest.raises(ValueError, match="bbox"):
        mask_record(np.ones((2, 2), bool), 0.5, bbox=[0, 0, 1, 1])

