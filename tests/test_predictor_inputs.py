"""Predictor inputs: each malformed image, prompt or size is refused with one SlimsegError line
that names the argument, instead of a torch/numpy/PIL error or a silently wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo, random_tiny_model

import slimseg
from slimseg.errors import SlimsegError
from slimseg.inference.predictor import ImageEmbedding
from slimseg.inference.transforms import ResizeLongestSide

POINT = dict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(3).eval()


@pytest.fixture(scope="module")
def embedding(model):
    return slimseg.Predictor(model).embed_images([photo(120, 160)])[0]


@pytest.fixture()
def predictor(model, embedding):
    predictor = slimseg.Predictor(model)
    predictor.set_embedding(embedding)
    return predictor


def _refused(call, *fragments: str) -> None:
    with pytest.raises(SlimsegError) as caught:
        call()
    message = str(caught.value)
    assert all(fragment in message for fragment in fragments), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "prompt, fragments",
    [
        (dict(point_coords=np.array([[np.nan, 40.0]]), point_labels=np.array([1])), ("point_coords", "finite")),
        (dict(point_coords=np.array([[50.0, np.inf]]), point_labels=np.array([1])), ("point_coords", "finite")),
        (dict(box=np.array([np.nan, 10, 50, 50])), ("box", "finite")),
        (dict(box=np.array([10, 10, np.inf, 50])), ("box", "finite")),
        (dict(point_coords=np.array([50, 40]), point_labels=np.array([1])), ("point_coords", "(N, 2)", "(2,)")),
        (dict(point_coords=[[50, 40]], point_labels=[1, 0]), ("point_labels", "one label per point")),
        (dict(point_coords=[[50, 40], [60, 70]], point_labels=[1, 2]), ("point_labels", "1 (foreground) or 0", "2")),
        (dict(point_coords=[[50, 40]], point_labels=[-1]), ("point_labels", "-1", "predict_torch")),
        (dict(point_coords=[[50, 40]], point_labels=[0.5]), ("point_labels", "0.5")),
        (dict(point_coords=[["a", 40]], point_labels=[1]), ("point_coords",)),
        (dict(box=[1, 2, 3]), ("box must be 4 numbers", "(3,)")),
        (dict(box=np.array([[1, 2, 30, 40], [5, 5, 60, 60]])), ("box", "(2, 4)", "predict_torch")),
        (dict(box=np.arange(8)), ("box", "(8,)", "predict_torch")),
        (dict(box=None, mask_input=np.zeros((1, 256, 256))), ("mask_input", "(1, 64, 64)", "(1, 256, 256)")),
        (dict(mask_input=np.zeros((64, 64))), ("mask_input", "(1, 64, 64)")),
        (dict(mask_input=np.zeros((1, 1, 64, 64))), ("mask_input", "(1, 64, 64)")),
    ],
)
def test_malformed_prompts_are_refused(predictor, prompt, fragments):
    _refused(lambda: predictor.predict(**prompt), *fragments)


def test_well_formed_prompts_in_every_accepted_spelling_agree(predictor):
    box = predictor.predict(box=np.array([10, 10, 100, 90]))
    for spelling in ([10, 10, 100, 90], np.array([[10, 10, 100, 90]]), torch.tensor([10.0, 10, 100, 90])):
        np.testing.assert_array_equal(predictor.predict(box=spelling)[2], box[2])
    points = predictor.predict(**POINT)
    same = predictor.predict(point_coords=[[50, 40]], point_labels=[True])
    np.testing.assert_array_equal(same[2], points[2])
    # the low-res logits of one call are a valid mask_input of the next
    predictor.predict(**POINT, mask_input=points[2][:1], multimask_output=False)


def test_mask_input_shape_follows_the_model(predictor):
    """(1, 4h, 4w) of the model's embedding: 160x160 for Lite-SAM's 640-px input."""
    lite = slimseg.build_model("lite-sam").eval()
    lite_predictor = slimseg.Predictor(lite)
    blank = torch.zeros_like(lite.prompt_encoder.get_dense_pe())
    lite_predictor.set_embedding(ImageEmbedding(blank, (640, 640), (640, 640)))
    _refused(lambda: lite_predictor.predict(**POINT, mask_input=np.zeros((1, 256, 256))), "(1, 160, 160)")
    _, _, low_res = lite_predictor.predict(**POINT, mask_input=np.zeros((1, 160, 160)), multimask_output=False)
    assert low_res.shape == (1, 160, 160)


def test_predict_torch_keeps_segment_anythings_labels(predictor):
    """-1 (padding) and 2, 3 (box corners) stay available where segment-anything takes them."""
    coords = torch.tensor([[[50.0, 40.0], [0.0, 0.0]]])
    masks, _, _ = predictor.predict_torch(coords, torch.tensor([[1, -1]]))
    assert masks.shape[:2] == (1, 3)


@pytest.mark.parametrize("shape", [(1, 513), (513, 1), (2, 1100)])
def test_too_elongated_images_name_the_shape_and_the_limit(model, shape):
    predictor = slimseg.Predictor(model)
    image = np.zeros((*shape, 3), np.uint8)
    _refused(lambda: predictor.set_image(image), f"image shape {(*shape, 3)}", "256-px", "512 times")
    generator = slimseg.MaskGenerator(model, points_per_side=2)
    _refused(lambda: generator.generate(image), f"image shape {(*shape, 3)}", "512 times")


def test_resize_is_segment_anythings_up_to_the_limit(model):
    from segment_anything.utils.transforms import ResizeLongestSide as SamResize

    ours, theirs = ResizeLongestSide(256), SamResize(256)
    rng = np.random.default_rng(0)
    for height, width in [(1, 512), (512, 1), (2, 1023), (3, 5), (1, 1), *rng.integers(1, 3000, (200, 2)).tolist()]:
        if max(height, width) > 512 * min(height, width):
            continue
        expected = theirs.get_preprocess_shape(height, width, 256)
        assert ours.get_preprocess_shape(height, width, 256) == expected
        if height * width < 10**5:
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            np.testing.assert_array_equal(ours.apply_image(image), theirs.apply_image(image))
    predictor = slimseg.Predictor(model)
    predictor.set_image(np.zeros((1, 512, 3), np.uint8))  # the most elongated image allowed
    assert predictor.input_size == (1, 256)


def test_a_failed_set_image_leaves_no_image(predictor):
    with pytest.raises(SlimsegError):
        predictor.set_image(np.zeros((10, 10), np.uint8))
    assert not predictor.is_image_set
    _refused(lambda: predictor.predict(**POINT), "no image is set")


@pytest.mark.parametrize(
    "image, size, fragments",
    [
        (torch.zeros(1, 3, 192, 256), (0, 0), ("original_image_size", "two positive integers")),
        (torch.zeros(1, 3, 192, 256), (120,), ("original_image_size",)),
        (torch.zeros(1, 3, 192, 256), (120.5, 160), ("original_image_size",)),
        (np.zeros((1, 3, 192, 256), np.float32), (120, 160), ("torch.Tensor", "ndarray")),
    ],
)
def test_set_torch_image_checks_its_arguments(predictor, image, size, fragments):
    _refused(lambda: predictor.set_torch_image(image, size), *fragments)
    assert not predictor.is_image_set


def test_set_torch_image_takes_a_torch_size(predictor):
    image = photo(120, 160)
    pixels = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None]
    predictor.set_torch_image(pixels, torch.Size(image.shape[:2]))
    assert predictor.original_size == (120, 160) and predictor.input_size == (192, 256)


def test_embed_images_given_one_image_asks_for_a_list(predictor):
    _refused(lambda: predictor.embed_images(photo(120, 160)), "embed_images takes a list", "(120, 160, 3)", "[image]")


def test_a_segment_anything_model_is_refused_with_the_way_to_load_it():
    from conftest import tiny_config
    from reference import reference_sam

    with pytest.raises(SlimsegError, match=r"segment_anything\.modeling\.sam\.Sam .*no img_size.*slimseg\.load_model"):
        slimseg.Predictor(reference_sam(tiny_config()))
