"""``MaskGenerator`` against segment-anything's ``SamAutomaticMaskGenerator``: whole runs,
small-region post-processing, point proposers and argument checks (its parts are in
test_everything_parts.py)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from conftest import photo, tiny_config
from reference import randomise, real_photo, reference_sam

import slimseg
from slimseg.errors import SlimsegError
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.predictor import Predictor
from slimseg.inference.everything.boxes import batched_mask_to_box
from slimseg.inference.everything.crops import generate_crop_boxes
from slimseg.inference.everything.data import MaskBatch
from slimseg.inference.everything.rle import mask_to_rle


def _sam_amg():
    """segment_anything.utils.amg (importable once conftest has provided torchvision)."""
    from segment_anything.utils import amg

    return amg


# --------------------------------------------------------------------------------------------
# Parity of whole runs


def _toy_state(reference: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights that give masks worth filtering.

    With ``randomise`` alone the decoder's random biases swamp everything: logits are about
    0.01, the same for every point, so every mask is empty or full and NMS leaves three.
    Zeroing the decoder's biases makes the masks depend on the point, smooth absolute
    position embeddings and nearest-neighbour upscaling make them blobs rather than speckle,
    and larger output layers put logits and predicted IoUs on SAM's scale (a few units).
    """
    state = randomise(reference, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    _, rows, columns, width = state["image_encoder.pos_embed"].shape
    ys, xs = torch.meshgrid(torch.arange(rows) / rows, torch.arange(columns) / columns, indexing="ij")
    frequency = 0.5 * torch.randn(width, 2, generator=generator)
    phase = 2 * math.pi * torch.rand(width, generator=generator)
    waves = torch.sin(2 * math.pi * (frequency[:, :1, None] * ys + frequency[:, 1:, None] * xs) + phase[:, None, None])
    state["image_encoder.pos_embed"] = 2 * waves.permute(1, 2, 0)[None]
    decoder_parts = ("image_encoder.neck.", "mask_decoder.transformer.", "mask_decoder.output_upscaling.",
                     "mask_decoder.output_hypernetworks_mlps.")
    for key in state:
        if key.startswith(decoder_parts) and key.endswith("bias"):
            state[key] = torch.zeros_like(state[key])
        elif key.startswith("mask_decoder.output_hypernetworks_mlps.") and key.endswith("layers.2.weight"):
            state[key] = state[key] * 1000
    for key in ("image_encoder.neck.1.weight", "image_encoder.neck.3.weight",
                "mask_decoder.transformer.norm_final_attn.weight", "mask_decoder.output_upscaling.1.weight"):
        state[key] = torch.ones_like(state[key])
    for key in ("mask_decoder.output_upscaling.0.weight", "mask_decoder.output_upscaling.3.weight"):
        state[key] = state[key][:, :, :1, :1].expand_as(state[key]).clone()
    iou_head = "mask_decoder.iou_prediction_head.layers.2.weight"
    state[iou_head] = state[iou_head] * 30
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    reference = reference_sam(tiny_config())
    state = _toy_state(reference, seed=0)
    reference.load_state_dict(state)
    path = tmp_path_factory.mktemp("everything") / "toy_sam.pth"
    torch.save(state, path)
    return reference, slimseg.load_model(path, device="cpu")


def _small_photo() -> np.ndarray:
    return photo(200, 300)


def _small_real_photo() -> np.ndarray:
    return cv2.resize(real_photo(), (128, 150), interpolation=cv2.INTER_AREA)


# Over this toy model's 192 candidates (points_per_side=8 on the photo) predicted IoUs have
# quartiles -0.4 / 0.4 / 0.93 and stability scores 0.34 / 0.56 / 0.79 (offset 1). With these
# thresholds 14 masks survive, 24 without them; NMS removes most of the rest.
THRESHOLDS = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.1)
PARITY_CASES = {
    "grid": (_small_photo, dict(points_per_batch=48)),
    "crops": (_small_photo, dict(points_per_side=6, crop_n_layers=1, crop_n_points_downscale_factor=2)),
    # 400 px changes 5 of the 14 masks (20 px would change none of these blobby masks).
    "small regions": (_small_photo, dict(min_mask_region_area=400)),
    "uncompressed rle": (_small_photo, dict(points_per_side=6, output_mode="uncompressed_rle")),
    "coco rle": (_small_photo, dict(points_per_side=6, output_mode="coco_rle")),
    "real photo": (_small_real_photo, dict()),
}


def _assert_same_records(ours: list[dict], theirs: list[dict], output_mode: str) -> None:
    assert len(ours) == len(theirs)
    for index, (mine, their) in enumerate(zip(ours, theirs)):
        assert set(mine) == set(their), index
        assert mine["bbox"] == their["bbox"], index
        assert mine["crop_box"] == their["crop_box"], index
        assert mine["point_coords"] == their["point_coords"], index
        assert mine["predicted_iou"] == pytest.approx(their["predicted_iou"], abs=1e-4), index
        assert mine["stability_score"] == pytest.approx(their["stability_score"], abs=1e-4), index
        if output_mode == "binary_mask":
            assert mine["segmentation"].shape == their["segmentation"].shape
            assert mine["segmentation"].dtype == their["segmentation"].dtype == bool
            # Pixels whose logit is within float noise of 0 may flip; nothing else may.
            flipped = int((mine["segmentation"] != their["segmentation"]).sum())
            assert flipped <= 5, index
            assert abs(mine["area"] - their["area"]) <= flipped, index
        else:
            assert mine["segmentation"] == their["segmentation"], index
            assert mine["area"] == their["area"], index


@pytest.mark.parametrize("case", PARITY_CASES)
def test_generate_matches_segment_anything(models, case):
    from segment_anything import SamAutomaticMaskGenerator

    reference, model = models
    make_image, options = PARITY_CASES[case]
    options = {**THRESHOLDS, **options}
    image = make_image()
    with torch.no_grad():
        theirs = SamAutomaticMaskGenerator(reference, **options).generate(image)
    generator = MaskGenerator(model, **options)
    ours = generator.generate(image)
    candidates = 3 * options["points_per_side"] ** 2
    assert 5 < len(theirs) < candidates, "the thresholds should keep some masks and drop others"
    _assert_same_records(ours, theirs, options.get("output_mode", "binary_mask"))
    assert set(generator.last_timings) == {"encoder", "proposer", "decoder", "postprocess", "total"}
    assert generator.last_timings["total"] >= generator.last_timings["decoder"] > 0
    if case == "crops":
        assert len({tuple(record["crop_box"]) for record in ours}) > 1, "masks from the crops should survive"


def test_small_region_postprocessing_is_segment_anythings():
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import MaskData

    rng = np.random.default_rng(2)
    masks = np.zeros((6, 40, 50), bool)
    masks[0, 5:30, 5:30] = True
    masks[0, 10:12, 10:12] = False  # a small hole
    masks[1] = masks[0]
    masks[1, 35:37, 45:47] = True  # the same mask plus a small island: a duplicate once cleaned
    masks[2, 20:39, 20:49] = True  # clean
    masks[3] = cv2.blur(rng.random((40, 50)), (3, 3)) > 0.55  # speckle: holes and islands
    masks[4, 1:3, 1:3] = True  # only small islands: the largest stays
    masks[4, 30:33, 40:44] = True
    masks[5, 0:40, 10:40] = True
    masks[5, 0:3, 0:5] = True  # small island that touches the border
    rles = mask_to_rle(torch.from_numpy(masks))
    boxes = batched_mask_to_box(torch.from_numpy(masks)).numpy()
    columns = dict(iou_preds=np.linspace(0.9, 0.8, 6), stability_score=np.linspace(0.7, 0.6, 6))

    theirs = MaskData(rles=[dict(r) for r in rles], boxes=boxes.copy(), **columns)
    SamAutomaticMaskGenerator.postprocess_small_regions(theirs, 10, 0.7)
    ours = MaskBatch(rles=[dict(r) for r in rles], boxes=boxes.copy(), **columns)
    MaskGenerator.postprocess_small_regions(ours, 10, 0.7)
    assert ours["rles"] == theirs["rles"] and 0 < len(ours) < 6
    assert np.array_equal(ours["boxes"], theirs["boxes"]) and np.array_equal(ours["iou_preds"], theirs["iou_preds"])


def test_point_proposer_prompts_each_crop(models):
    _, model = models
    image = photo(120, 160)
    calls = []

    def proposer(crop: np.ndarray, predictor: slimseg.Predictor) -> np.ndarray:
        assert predictor.is_image_set and predictor.original_size == crop.shape[:2]
        calls.append(crop.shape)
        return np.array([[crop.shape[1] / 2, crop.shape[0] / 2], [10.0, 12.0]])

    generator = MaskGenerator(model, sampler="autoppn", point_proposer=proposer, pred_iou_thresh=0,
                              stability_score_thresh=0, crop_n_layers=1)
    records, timings = generator.generate_timed(image)
    crops = generate_crop_boxes((120, 160), 1, 512 / 1500)[0]
    assert calls == [(y1 - y0, x1 - x0, 3) for x0, y0, x1, y1 in crops]
    assert records and timings["proposer"] >= 0
    full_image = [record for record in records if record["crop_box"] == [0, 0, 160, 120]]
    assert {tuple(record["point_coords"][0]) for record in full_image} <= {(80.0, 60.0), (10.0, 12.0)}


# --------------------------------------------------------------------------------------------
# Arguments


def test_autoppn_model_proposes_the_points(models):
    from slimseg.compress.train import with_autoppn
    from slimseg.modeling.autoppn import propose_points

    model = with_autoppn(models[1])  # the same SAM with a (random) AutoPPN head
    image = photo(120, 160)  # input frame 192 x 256: 1.6 input pixels per image pixel
    generator = MaskGenerator(model, sampler="autoppn", pred_iou_thresh=0, stability_score_thresh=0,
                              max_proposals=5, proposal_thresh=0.0)
    records = generator.generate(image)
    predictor = Predictor(model)
    predictor.set_image(image)
    logits = model.autoppn(predictor.get_image_embedding())
    proposed = propose_points(logits, 5, 0.0, model.img_size, (192, 256))[0].points.double().numpy() / 1.6
    assert 1 <= len(proposed) <= 5
    assert records and {tuple(r["point_coords"][0]) for r in records} <= {tuple(p) for p in proposed.tolist()}
    with pytest.raises(SlimsegError, match="max_proposals must be an integer >= 1"):
        MaskGenerator(model, sampler="autoppn", max_proposals=0)
    with pytest.raises(SlimsegError, match="apply to the model's own AutoPPN"):
        MaskGenerator(model, sampler="grid", max_proposals=10)


def test_autoppn_without_a_proposer_needs_an_autoppn_model(models):
    _, model = models
    with pytest.raises(SlimsegError, match="needs a model with an AutoPPN"):
        MaskGenerator(model, sampler="autoppn")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(points_per_side=None), "exactly one of points_per_side and point_grids"),
        (dict(point_grids=[np.zeros((4, 2))]), "exactly one of points_per_side and point_grids"),
        (dict(points_per_side=0), "points_per_side must be an integer >= 1"),
        (dict(points_per_side=2.5), "points_per_side must be an integer"),
        (dict(points_per_batch=0), "points_per_batch"),
        (dict(pred_iou_thresh=1.5), "pred_iou_thresh must be in [0, 1]"),
        (dict(stability_score_thresh=-0.1), "stability_score_thresh"),
        (dict(stability_score_offset=float("nan")), "stability_score_offset must be a finite number"),
        (dict(box_nms_thresh=2), "box_nms_thresh"),
        (dict(crop_nms_thresh=-1), "crop_nms_thresh"),
        (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio must be in [0, 1)"),
        (dict(crop_n_layers=-1), "crop_n_layers"),
        (dict(crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor"),
        (dict(points_per_side=4, crop_n_layers=2, crop_n_points_downscale_factor=4), "leaves no points"),
        (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), "point_grids[0] must have shape (N, 2)"),
        (dict(points_per_side=None, point_grids=[np.full((4, 2), 2.0)]), "normalised to [0, 1]"),
        (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), "crop_n_layers needs 2"),
        (dict(min_mask_region_area=-5), "min_mask_region_area"),
        (dict(output_mode="png"), "output_mode must be one of binary_mask, uncompressed_rle, coco_rle"),
        (dict(sampler="random"), "sampler must be one of grid, autoppn"),
        (dict(point_proposer=lambda crop, predictor: None), "only used with sampler='autoppn'"),
        (dict(sampler="autoppn", point_proposer=3), "point_proposer must be callable"),
        (dict(sampler="autoppn", point_proposer=print, points_per_side=None, point_grids=[np.zeros((1, 2))]),
         "point_grids cannot be combined"),
        # limits that keep the grid and the crops within memory (100000 asked numpy for 75 GiB)
        (dict(points_per_side=100000), "points_per_side must be an integer >= 1 and <= 1024, got 100000"),
        (dict(points_per_side=1025), "<= 1024"),
        (dict(crop_n_layers=5), "crop_n_layers must be an integer >= 0 and <= 4, got 5"),
        # the AutoPPN options are checked before the model's AutoPPN is looked for
        (dict(sampler="autoppn", max_proposals=2.5), "max_proposals must be an integer >= 1, got 2.5"),
        (dict(sampler="autoppn", max_proposals=True), "max_proposals must be an integer"),
        (dict(sampler="autoppn", max_proposals="5"), "max_proposals must be an integer"),
        (dict(sampler="autoppn", proposal_thresh="0.1"), "proposal_thresh must be a finite number"),
        (dict(sampler="autoppn", proposal_thresh=float("nan")), "proposal_thresh must be a finite number"),
        (dict(sampler="autoppn", proposal_thresh=1.0), "proposal_thresh must be in [0, 1)"),
        (dict(pred_iou_thresh=torch.tensor(1.5)), "pred_iou_thresh must be in [0, 1]"),
        (dict(pred_iou_thresh=torch.tensor([0.5])), "pred_iou_thresh must be a finite number"),
        (dict(box_nms_thresh=np.bool_(True)), "box_nms_thresh must be a finite number"),
    ],
)
def test_bad_arguments_raise_one_line(models, options, fragment):
    _, model = models
    with pytest.raises(SlimsegError) as caught:
        MaskGenerator(model, **options)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 3), (3, 2)])
def test_crop_layers_skip_the_empty_crops_of_tiny_images(models, height, width):
    _, model = models
    image = photo(height, width, seed=2)
    generator = MaskGenerator(model, points_per_side=2, crop_n_layers=2, pred_iou_thresh=0, stability_score_thresh=0)
    records = generator.generate(image)
    assert records and all(r["crop_box"][2] > 0 and r["crop_box"][3] > 0 for r in records)
    again = generator.generate(image, generator.embed([image])[0])  # embeddings of the same crops
    assert [r["bbox"] for r in again] == [r["bbox"] for r in records]


def test_bad_model_and_image_raise(models):
    _, model = models
    with pytest.raises(SlimsegError, match="SAM-family model"):
        MaskGenerator(torch.nn.Linear(2, 2))
    with pytest.raises(SlimsegError, match="HxWx3 uint8"):
        MaskGenerator(model).generate(np.zeros((10, 10), np.uint8))


def test_defaults_are_segment_anythings():
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    theirs = inspect.signature(SamAutomaticMaskGenerator).parameters
    ours = inspect.signature(MaskGenerator).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert all(ours[name].default == theirs[name].default for name in theirs)
    assert ours["sampler"].default == "grid" and ours["point_proposer"].default is None


def test_scalar_tensors_and_numpy_numbers_are_numbers(models):
    _, model = models
    image = photo(60, 80)
    plain = MaskGenerator(model, points_per_side=4, pred_iou_thresh=0.3, stability_score_thresh=0.1,
                          crop_overlap_ratio=0.25).generate(image)
    scalars = MaskGenerator(model, points_per_side=np.int64(4), pred_iou_thresh=torch.tensor(0.3),
                            stability_score_thresh=np.float32(0.1), crop_overlap_ratio=np.array(0.25))
    assert type(scalars.pred_iou_thresh) is float and type(scalars.crop_overlap_ratio) is float
    assert [r["bbox"] for r in scalars.generate(image)] == [r["bbox"] for r in plain]


def test_generate_from_two_threads_matches_one_at_a_time(models):
    """Each generate() decodes with its own predictor: threads sharing one generator neither
    see each other's image nor find it unset."""
    import threading

    _, model = models
    generator = MaskGenerator(model, points_per_side=8, points_per_batch=4, pred_iou_thresh=0.3,
                              stability_score_thresh=0.1)
    images = [photo(200, 300, seed=1), photo(160, 240, seed=2)]
    expected = [_record_keys(generator.generate(image)) for image in images]
    assert expected[0] != expected[1]
    start, got, errors = threading.Barrier(2), [[], []], []

    def work(index: int) -> None:
        start.wait()
        try:
            for _ in range(2):
                got[index].append(_record_keys(generator.generate(images[index])))
        except Exception as error:  # reported below: a thread's exception would be lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert got == [[expected[0]] * 2, [expected[1]] * 2]
    assert not generator.predictor.is_image_set


def _record_keys(records: list[dict]) -> list[tuple]:
    return [(r["area"], tuple(r["bbox"]), round(r["predicted_iou"], 5), tuple(r["point_coords"][0])) for r in records]


def test_embed_given_one_image_asks_for_a_list(models):
    _, model = models
    with pytest.raises(SlimsegError, match=r"embed takes a list of images, got one image of shape \(60, 80, 3\)"):
        MaskGenerator(model, points_per_side=2).embed(photo(60, 80))
