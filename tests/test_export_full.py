"""Full-size exports with random weights: Lite-SAM always; SAM-B and SlimSAM-77 (each several
minutes on 2 CPU cores) when SLIMSEG_FULL_EXPORT=1. ``export_onnx`` itself fails past the
tolerance; these tests also check the recorded figures and, for Lite-SAM, AutoPPN proposals."""

from __future__ import annotations

import os

import pytest
import torch

import slimseg
from slimseg.export.onnx import export_onnx
from slimseg.export.runtime import OnnxSam
from slimseg.modeling.sam import sam_b_config, sam_vit_config

pytest.importorskip("onnxruntime")
CASES = ("encoder_batch2", "1_box", "16_boxes", "points_padded", "mask_input")
full = pytest.mark.skipif(os.environ.get("SLIMSEG_FULL_EXPORT") != "1",
                          reason="SAM-B/SlimSAM-77 exports take minutes: set SLIMSEG_FULL_EXPORT=1")


def _check(manifest: dict) -> None:
    diffs = manifest["verification"]["diffs"]["float32"]
    for case in CASES:
        assert max(d["rel"] for d in diffs[case].values()) < 1e-3, case


def _by_position(points: torch.Tensor, scores: torch.Tensor) -> dict[tuple[float, float], float]:
    return {(float(x), float(y)): float(score) for (x, y), score in zip(points, scores)}


@pytest.mark.slow
def test_lite_sam_export_matches_torch_with_autoppn(tmp_path):
    torch.manual_seed(0)
    model = slimseg.build_model("lite-sam")
    manifest = export_onnx(model, tmp_path / "lite")
    _check(manifest)
    assert manifest["verification"]["diffs"]["float32"]["autoppn"]["heatmap_logits"]["rel"] < 1e-3
    exported = OnnxSam(tmp_path / "lite")
    embedding = torch.randn(1, 256, 40, 40)
    with torch.no_grad():
        want = model.propose_points(embedding, valid_size=(480, 640))[0]
    got = exported.propose_points(embedding, valid_size=(480, 640))[0]
    # Random weights give ~200 peaks whose scores lie within 0.03 of each other, some 1e-7
    # apart, so float rounding may swap their order or, rarely, which of two equal neighbours
    # is the peak: compare the proposals as a set of positions and allow one such flip.
    want_at, got_at = _by_position(want.points, want.scores), _by_position(got.points, got.scores)
    shared = want_at.keys() & got_at.keys()
    assert len(want_at) > 100 and len(want_at.keys() ^ got_at.keys()) <= 2
    assert max(abs(want_at[p] - got_at[p]) for p in shared) < 1e-5
    assert torch.all(got.scores[:-1] >= got.scores[1:])


@full
def test_sam_b_export_matches_torch(tmp_path):
    _check(export_onnx(slimseg.build_model(sam_b_config()), tmp_path / "sam-b"))


@full
def test_slimsam_77_export_matches_torch_and_int8_runs(tmp_path):
    model = slimseg.build_model(sam_vit_config(168, 12, 12, (2, 5, 8, 11), mlp_dim=696))
    manifest = export_onnx(model, tmp_path / "slimsam-77", quantize="int8")
    _check(manifest)
    assert manifest["verification"]["int8_mask_iou"] > 0.9
