"""transformers SamModel checkpoints (SlimSAM-77's uniform config) load and match transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from reference import real_photo, transformers_slimsam_77

from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
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
    with pytest.raises(slimseg.SlimsegError, match="vision_config.hidden_size is 384 but the weights are 168 wide"):
        slimseg.load_model(copy, device="cpu")


def _with_config(folder, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(edit(config)))
    return copy


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda c: [1, 2], "not a SamModel config (a JSON list, not an object)"),
    (lambda c: {**c, "mask_decoder_config": {**c["mask_decoder_config"], "num_attention_heads": 7}},
     "mask_decoder_config.num_attention_heads 7 does not divide the decoder's attention widths [128, 256]"),
    (lambda c: {**c, "mask_decoder_config": {**c["mask_decoder_config"], "num_attention_heads": "8"}},
     "mask_decoder_config.num_attention_heads must be a whole number, got '8'"),
    (lambda c: {**c, "vision_config": {**c["vision_config"], "num_hidden_layers": 4}},
     "vision_config.num_hidden_layers is 4 but the weights have 12 blocks"),
    (lambda c: {**c, "vision_config": {**c["vision_config"], "global_attn_indexes": [1, 3]}},
     "vision_config.global_attn_indexes is [1, 3] but the weights' global-attention blocks are [2, 5, 8, 11]"),
    (lambda c: {**c, "vision_config": "big"}, "vision_config must be a JSON object"),
])
def test_bad_config_json_is_refused_naming_it(saved_slimsam_77, tmp_path, edit, reason):
    _, folder = saved_slimsam_77
    copy = _with_config(folder, tmp_path, edit)
    with pytest.raises(slimseg.SlimsegError) as caught:
        slimseg.load_model(copy, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"{copy / 'config.json'}: ") and reason in message and "\n" not in message, message


def test_sharded_folder_loads_like_the_single_file(saved_slimsam_77, tmp_path):
    hf_model, folder = saved_slimsam_77
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="10MB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    whole, split = read_checkpoint(folder), read_checkpoint(sharded)
    assert split.format == "transformers" and split.config == whole.config
    assert split.state_dict.keys() == whole.state_dict.keys()
    for key, tensor in whole.state_dict.items():
        assert torch.equal(split.state_dict[key], tensor), key
    # a converted shard would destroy the checkpoint it was read from
    result = CliRunner().invoke(app, ["convert", str(sharded), "--out", str(shards[0])])
    assert result.exit_code == 2 and "a file that this command reads" in result.stderr
    shards[-1].unlink()
    with pytest.raises(slimseg.SlimsegError, match=f"shard {shards[-1].name} is missing"):
        slimseg.load_model(sharded, device="cpu")


def test_convert_refuses_to_overwrite_the_folder_weights(saved_slimsam_77, tmp_path):
    _, folder = saved_slimsam_77
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = (copy / "model.safetensors").read_bytes()
    for out in (copy / "model.safetensors", tmp_path / "." / "copy" / ".." / "copy" / "model.safetensors"):
        result = CliRunner().invoke(app, ["convert", str(copy), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert f"{copy / 'model.safetensors'}" in result.stderr and "is a file that this command reads" in result.stderr
    assert (copy / "model.safetensors").read_bytes() == before


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(slimseg.SlimsegError, match="holds no model.safetensors"):
        slimseg.load_model(tmp_path, device="cpu")
