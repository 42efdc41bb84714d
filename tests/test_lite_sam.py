"""Lite-SAM: LiteViT budgets against the paper, AutoPPN targets/loss/proposals, LiteSam + Predictor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import slimseg
from slimseg.errors import SlimsegError
from slimseg.modeling.autoppn import (
    AutoPPN,
    AutoPPNConfig,
    autoppn_loss,
    autoppn_targets,
    interior_peak,
    propose_points,
)
from slimseg.modeling.complexity import count_macs, count_parameters
from slimseg.modeling.lite_sam import LiteSam, LiteSamConfig, lite_sam_budget
from slimseg.modeling.litevit import LiteViT, LiteViTConfig, litevit_1x_config, litevit_2x_config, litevit_3x_config

# Table 1 of the paper: parameters and MACs at 640x640
PAPER_LITEVIT = {
    "1x": (litevit_1x_config, 1.16e6, 10.9e9),
    "2x": (litevit_2x_config, 2.19e6, 22.3e9),
    "3x": (litevit_3x_config, 3.63e6, 38.0e9),
}


@pytest.mark.parametrize("size", sorted(PAPER_LITEVIT))
def test_litevit_parameters_and_macs_are_within_ten_percent_of_the_paper(size):
    make_config, paper_params, paper_macs = PAPER_LITEVIT[size]
    with torch.device("meta"):
        encoder = LiteViT(make_config()).requires_grad_(False)
        image = torch.empty(1, 3, 640, 640)
    params, macs = count_parameters(encoder), count_macs(encoder, image).layers
    assert abs(params / paper_params - 1) < 0.10, params
    assert abs(macs / paper_macs - 1) < 0.10, macs


def test_lite_sam_budget_is_near_the_papers_total():
    budget = lite_sam_budget(LiteSamConfig())
    assert abs(budget["total"]["parameters"] / 4.2e6 - 1) < 0.05
    assert abs(budget["total"]["macs"] / 12.7e9 - 1) < 0.10
    assert budget["prompt_encoder"]["parameters"] == 6_220


@pytest.fixture(scope="module")
def lite_sam() -> LiteSam:
    torch.manual_seed(0)
    return LiteSam(LiteSamConfig()).eval()


def test_lite_sam_forward_shapes(lite_sam):
    image = lite_sam.preprocess(torch.rand(1, 3, 480, 640) * 255)
    assert image.shape == (1, 3, 640, 640)
    with torch.no_grad():
        embedding, heatmaps = lite_sam(image)
        assert embedding.shape == (1, 256, 40, 40)
        assert heatmaps.shape == (1, 3, 40, 40)
        sparse, dense = lite_sam.prompt_encoder((torch.tensor([[[320.0, 240.0]]]), torch.ones(1, 1)), None, None)
        masks, iou = lite_sam.mask_decoder(embedding, lite_sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert masks.shape == (1, 3, 160, 160) and iou.shape == (1, 3)
    proposals = lite_sam.propose_points(embedding, valid_size=(480, 640))
    assert len(proposals) == 1 and proposals[0].points.shape[1] == 2
    assert (proposals[0].points[:, 1] < 480).all()


def test_predictor_on_lite_sam_returns_masks_at_the_original_size(lite_sam):
    predictor = slimseg.Predictor(lite_sam)
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.get_image_embedding().shape == (1, 256, 40, 40)
    assert predictor.input_size == (480, 640)
    masks, iou, low_res = predictor.predict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 300, 400) and masks.dtype == bool and iou.shape == (3,)
    assert low_res.shape == (3, 160, 160)
    masks, iou, low_res = predictor.predict(box=np.array([50, 60, 250, 220]), multimask_output=False)
    assert masks.shape == (1, 300, 400) and low_res.shape == (1, 160, 160)


def test_config_json_round_trip_and_invalid_configs():
    config = LiteSamConfig(litevit=litevit_2x_config(), autoppn=AutoPPNConfig(width=32, top_k=100))
    text = config.to_json()
    assert '"family": "lite-sam"' in text
    assert LiteSamConfig.from_json(text) == config
    assert LiteSamConfig.from_dict(config.to_dict()) == config
    with pytest.raises(SlimsegError, match="not a Lite-SAM"):
        LiteSamConfig.from_dict({**config.to_dict(), "family": "sam"})
    with pytest.raises(SlimsegError):
        LiteSamConfig.from_dict({"litevit": {"no_such_field": 1}})
    with pytest.raises(SlimsegError):
        LiteSamConfig.from_json("{not json")
    with pytest.raises(SlimsegError, match="widths"):
        LiteSamConfig(autoppn=AutoPPNConfig(in_chans=128)).validate()
    with pytest.raises(SlimsegError):
        LiteViT(dataclasses.replace(LiteViTConfig(), img_size=650))


def _disc(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_targets_peak_at_the_most_interior_pixel_in_the_right_size_group():
    shape = (240, 320)  # resized x2 to 640 wide, heatmap 40x40: 8 original pixels per cell
    area = shape[0] * shape[1]
    small = _disc(shape, (40, 50), 15)  # 0.9 % of the image
    medium = np.zeros(shape, bool)
    medium[120:230, 20:130] = True  # 15.8 %
    large = np.zeros(shape, bool)
    large[10:230, 160:310] = True
    large[10:80, 160:230] = False  # an L shape (36.6 %): its interior point is not its box centre
    assert small.sum() / area < 0.05 < medium.sum() / area < 0.25 < large.sum() / area
    target = autoppn_targets([small, medium, large, np.zeros(shape, bool)], shape, (40, 40), 640)
    assert target.shape == (3, 40, 40) and target.dtype == np.float32
    for group, mask in enumerate((small, medium, large)):
        row, col, _ = interior_peak(mask)
        assert mask[row, col]
        cell = (int((row + 0.5) * 2 / 16), int((col + 0.5) * 2 / 16))
        assert target[group][cell] == 1.0
        assert np.unravel_index(np.argmax(target[group]), (40, 40)) == cell
        assert (target[group] == 1.0).sum() == 1
    with pytest.raises(SlimsegError):
        autoppn_targets([np.zeros((10, 10), bool)], shape, (40, 40), 640)


def test_focal_loss_decreases_as_logits_move_toward_the_target():
    target = torch.zeros(2, 3, 16, 16)
    target[0, 0, 4, 4] = target[1, 2, 10, 3] = target[0, 1, 8, 8] = 1.0
    target[0, 1, 7:10, 9] = 0.6
    ideal = torch.logit(target.clamp(0.02, 0.98))
    previous = None
    for step in (0.0, 0.25, 0.5, 0.75, 1.0):
        losses = autoppn_loss(ideal * step + torch.full_like(ideal, 2.0) * (1 - step), target)
        assert set(losses) == {"loss", "loss_small", "loss_medium", "loss_large"}
        if previous is not None:
            for key, value in losses.items():
                assert value < previous[key], key
        previous = losses
    logits = torch.zeros_like(target, requires_grad=True)
    autoppn_loss(logits, target)["loss"].backward()
    stepped = autoppn_loss(logits.detach() - 0.5 * logits.grad, target)["loss"]
    assert stepped < autoppn_loss(torch.zeros_like(target), target)["loss"]


def test_propose_points_finds_peaks_and_respects_top_k_and_threshold():
    logits = torch.full((1, 3, 20, 20), -8.0)
    peaks = {(0, 3, 4): 4.0, (1, 10, 12): 2.0, (2, 15, 2): 0.0, (1, 18, 18): -2.0}  # sigmoid .98 .88 .5 .12
    for (group, row, col), value in peaks.items():
        logits[0, group, row, col] = value
    logits[0, 0, 3, 5] = 3.0  # a shoulder of the first peak, not a peak itself
    logits[0, 2, 10, 12] = 1.0  # the same cell as a higher peak of another group
    points, scores, groups = propose_points(logits, top_k=256, score_threshold=0.05, input_size=640)[0]
    stride = 640 / 20
    expected = [((col + 0.5) * stride - 0.5, (row + 0.5) * stride - 0.5) for (_, row, col) in peaks]
    assert torch.allclose(points, torch.tensor(expected))
    assert groups.tolist() == [0, 1, 2, 1]
    assert torch.all(scores[:-1] >= scores[1:])
    assert len(propose_points(logits, top_k=2, score_threshold=0.05, input_size=640)[0].points) == 2
    assert len(propose_points(logits, top_k=256, score_threshold=0.6, input_size=640)[0].points) == 2
    kept = propose_points(logits, 256, 0.05, 640, valid_size=(400, 640))[0].points
    assert len(kept) == 2 and (kept[:, 1] < 400).all()


def test_autoppn_runs_on_a_sam_embedding():
    ppn = AutoPPN(AutoPPNConfig()).eval()
    features = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        logits = ppn(features)
    assert logits.shape == (1, 3, 64, 64)
    assert torch.allclose(logits.sigmoid().mean(), torch.tensor(0.1), atol=0.05)  # the -2.19 prior
    proposals = ppn.propose(features, input_size=1024)[0]
    assert len(proposals.points) <= 256 and (proposals.points >= 0).all() and (proposals.points < 1024).all()
    target = torch.from_numpy(autoppn_targets([_disc((1024, 1024), (500, 400), 100)], (1024, 1024), 64, 1024))
    losses = autoppn_loss(ppn(features), target[None])
    losses["loss"].backward()
    assert ppn.proj.weight.grad is not None
    with pytest.raises(SlimsegError):
        ppn(torch.randn(1, 128, 64, 64))
