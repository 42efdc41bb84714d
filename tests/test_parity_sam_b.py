"""Full-size SAM-B: slimseg's Predictor against segment-anything's SamPredictor, same weights.

One random-init checkpoint is written in segment-anything's own layout (fused qkv) and
loaded through ``slimseg.load_model``, so the loader is part of what is checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import randomise, real_photo, reference_sam

import slimseg
from slimseg.modeling.sam import sam_b_config

pytestmark = pytest.mark.slow

PROMPTS = {
    "one point": dict(point_coords=np.array([[256.0, 300.0]]), point_labels=np.array([1])),
    "points with a negative": dict(point_coords=np.array([[256.0, 300.0], [100.0, 80.0], [400, 520]]),
                                   point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([100.0, 90.0, 420.0, 500.0])),
    "box and point": dict(box=np.array([100.0, 90.0, 420.0, 500.0]), point_coords=np.array([[300.0, 200.0]]),
                          point_labels=np.array([0])),
}


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    reference = reference_sam(sam_b_config())
    state = randomise(reference)
    checkpoint = tmp_path_factory.mktemp("sam_b") / "sam_vit_b_random.pth"
    torch.save(state, checkpoint)
    image = real_photo()
    theirs = SamPredictor(reference)
    ours = slimseg.Predictor(slimseg.load_model(checkpoint, device="cpu"))
    with torch.no_grad():
        theirs.set_image(image)
    ours.set_image(image)
    return theirs, ours


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def test_image_embedding_matches(predictors):
    theirs, ours = predictors
    assert ours.input_size == theirs.input_size and ours.original_size == theirs.original_size
    assert _relative_error(ours.get_image_embedding().numpy(), theirs.get_image_embedding().numpy()) <= 1e-3


@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches(predictors, name, multimask):
    theirs, ours = predictors
    kwargs = dict(PROMPTS[name], multimask_output=multimask)
    their_logits, their_iou, their_low = theirs.predict(**kwargs, return_logits=True)
    our_logits, our_iou, our_low = ours.predict(**kwargs, return_logits=True)
    assert our_low.shape == their_low.shape == ((3 if multimask else 1), 256, 256)
    assert _relative_error(our_low, their_low) <= 1e-3
    np.testing.assert_allclose(our_iou, their_iou, atol=1e-4)
    # Random weights can put a whole mask on one side of 0; thresholds at the logits' quartiles
    # make sure that full-size masks with real boundaries agree too.
    for level in np.quantile(their_logits, [0.25, 0.5, 0.75]):
        assert ((our_logits > level) != (their_logits > level)).mean() < 1e-4
    their_masks, _, _ = theirs.predict(**kwargs)
    our_masks, _, _ = ours.predict(**kwargs)
    assert our_masks.dtype == their_masks.dtype == bool and our_masks.shape == their_masks.shape
    # Pixels whose logit is within float noise of the threshold may flip; nothing else may.
    disagree = our_masks != their_masks
    assert disagree.sum() <= max(10, 1e-5 * disagree.size)
    assert np.all(np.abs(their_logits[disagree]) < 1e-3 * np.abs(their_logits).max())


def test_mask_input_matches(predictors):
    theirs, ours = predictors
    _, _, their_low = theirs.predict(**PROMPTS["one point"], multimask_output=True)
    kwargs = dict(PROMPTS["points with a negative"], mask_input=their_low[:1], multimask_output=False,
                  return_logits=True)
    their = theirs.predict(**kwargs)
    our = ours.predict(**kwargs)
    assert _relative_error(our[2], their[2]) <= 1e-3
    np.testing.assert_allclose(our[1], their[1], atol=1e-4)


def test_predict_torch_many_boxes_matches(predictors):
    theirs, ours = predictors
    boxes = np.array([[100, 90, 420, 500], [0, 0, 200, 200], [300, 250, 511, 599]], dtype=float)
    their_boxes = theirs.transform.apply_boxes_torch(torch.as_tensor(boxes), theirs.original_size)
    our_boxes = ours.transform.apply_boxes_torch(torch.as_tensor(boxes), ours.original_size)
    torch.testing.assert_close(our_boxes, their_boxes.float())
    with torch.no_grad():
        their_masks, their_iou, their_low = theirs.predict_torch(None, None, boxes=their_boxes, multimask_output=True)
    our_masks, our_iou, our_low = ours.predict_torch(None, None, boxes=our_boxes, multimask_output=True)
    assert our_low.shape == their_low.shape == (3, 3, 256, 256)
    assert _relative_error(our_low.numpy(), their_low.numpy()) <= 1e-3
    torch.testing.assert_close(our_iou, their_iou, atol=1e-4, rtol=0)
    assert (our_masks != their_masks).float().mean() < 1e-5
