"""transformers SamModel checkpoints (SlimSAM-77's uniform config) load and match transformers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from reference import real_photo, transformers_slimsam_77

import slimseg
from slimseg.zoo.checkpoint import read_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved_slimsam_77(tmp_path_factory):
    """A random-init SamModel with SlimSAM-77-uniform's config, saved with save_pretrained."""
    model = transformers_slimsam_77()
    folder = tmp_path_factory.mktemp("hf") / "slimsam-77-uniform"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def both(saved_slimsam_77):
    hf_model, folder = saved_slimsam_77
    ours = slimseg.Predictor(slimseg.load_model(folder, device="cpu"))
    ours.set_image(real_photo())
    with torch.no_grad():
        pixel_values = ours.model.preprocess(
            torch.as_tensor(ours.transform.apply_image(real_photo())).permute(2, 0, 1)[None].float()
        )
        hf_embeddings = hf_model.get_image_embeddings(pixel_values)
    return hf_model, hf_embeddings, ours


def test_architecture_is_read_as_slimsam_77(saved_slimsam_77):
    _, folder = saved_slimsam_77
    checkpoint = read_checkpoint(folder)
    encoder = checkpoint.config.image_encoder
    assert checkpoint.format == "transformers"
    assert encoder.embed_dim == 168 and encoder.global_attn_indexes == (2, 5, 8, 11)
    assert {(b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in encoder.blocks} == {(12, 168, 168, 696)}
    model = slimseg.build_model(checkpoint.config)
    assert sum(p.numel() for p in model.image_encoder.parameters()) == 5_658_968


def test_embeddings_match(both):
    hf_model, hf_embeddings, ours = both
    torch.testing.assert_close(ours.get_image_embedding(), hf_embeddings, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("prompt", ["point", "points", "box"])
@pytest.mark.parametrize("multimask", [True, False])
def test_logits_and_iou_match(both, prompt, multimask):
    hf_model, hf_embeddings, ours = both
    size = ours.original_size
    kwargs: dict = {}
    hf_inputs: dict = {}
    if prompt in ("point", "points"):
        points = np.array([[256.0, 300.0]] if prompt == "point" else [[256.0, 300.0], [100.0, 500.0]])
        labels = np.array([1] if prompt == "point" else [1, 0])
        kwargs = dict(point_coords=points, point_labels=labels)
        hf_inputs = dict(input_points=torch.tensor(ours.transform.apply_coords(points, size), dtype=torch.float)[None, None],
                         input_labels=torch.tensor(labels)[None, None])
    else:
        box = np.array([100.0, 90.0, 420.0, 500.0])
        kwargs = dict(box=box)
        hf_inputs = dict(input_boxes=torch.tensor(ours.transform.apply_boxes(box, size), dtype=torch.float)[None])
    with torch.no_grad():
        hf_out = hf_model(image_embeddings=hf_embeddings, multimask_output=multimask, **hf_inputs)
    _, our_iou, our_low_res = ours.predict(**kwargs, multimask_output=multimask)
    their_low_res = hf_out.pred_masks[0, 0].numpy()
    their_iou = hf_out.iou_scores[0, 0].numpy()
    assert our_low_res.shape == their_low_res.shape
    scale = np.abs(their_low_res).max()
    assert np.abs(our_low_res - their_low_res).max() <= 1e-3 * scale
    np.testing.assert_allclose(our_iou, their_iou, atol=1e-4)


def test_weights_file_alone_loads_from_shapes(saved_slimsam_77, tmp_path):
    _, folder = saved_slimsam_77
    lone = tmp_path / "weights.safetensors"
    shutil.copy(folder / "model.safetensors", lone)
    with_config = read_checkpoint(folder)
    alone = read_checkpoint(lone)
    assert alone.format == "transformers" and alone.config == with_config.config
    converted = slimseg.save_model(slimseg.load_model(lone, device="cpu"), tmp_path / "native.safetensors")
    assert read_checkpoint(converted).format == "slimseg"


def test_contradicting_config_json_is_refused(saved_slimsam_77, tmp_path):
    _, folder = saved_slimsam_77
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    text = (copy / "config.json").read_text().replace('"hidden_size": 168', '"hidden_size": 384')
    (copy / "config.json").write_text(text)
    with pytest.raises(slimseg.SlimsegError, match="says hidden_size 384"):
        slimseg.load_model(copy, device="cpu")


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(slimseg.SlimsegError, match="holds no model.safetensors"):
        slimseg.load_model(tmp_path, device="cpu")
