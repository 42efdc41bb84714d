"""Model configs: SAM-B/L/H sizes, pruned per-block widths, JSON and checkpoint round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

import slimseg
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import BlockConfig, Sam, SamConfig, sam_b_config, sam_h_config, sam_l_config, sam_vit_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "config, encoder_params",
    [(sam_b_config, 89_670_912), (sam_vit_config, 23_897_216), (sam_vit_config, 5_658_968)],
    ids=["sam-b", "slimsam-50-uniform", "slimsam-77-uniform"],
)
def test_parameter_counts_match_published_models(config, encoder_params):
    if config is sam_vit_config:
        embed = 384 if encoder_params > 10_000_000 else 168
        cfg = sam_vit_config(embed, 12, 12, (2, 5, 8, 11), mlp_dim=4 * embed if embed == 384 else 696)
    else:
        cfg = config()
    with torch.device("meta"):
        model = Sam(cfg)
    assert _count(model.image_encoder) == encoder_params
    assert _count(model.prompt_encoder) == 6_220
    assert _count(model.mask_decoder) == 4_058_340


def test_large_configs_describe_sam_l_and_h():
    assert (sam_l_config().image_encoder.embed_dim, sam_l_config().image_encoder.depth) == (1024, 24)
    assert sam_h_config().image_encoder.global_attn_indexes == (7, 15, 23, 31)


def _pruned_config() -> SamConfig:
    base = tiny_config()
    blocks = (
        BlockConfig(num_heads=4, qk_dim=24, v_dim=24, mlp_dim=40, window_size=8),
        BlockConfig(num_heads=4, qk_dim=36, v_dim=36, mlp_dim=72, window_size=0),
        BlockConfig(num_heads=2, qk_dim=12, v_dim=20, mlp_dim=16, window_size=8),
        BlockConfig(num_heads=4, qk_dim=48, v_dim=28, mlp_dim=96, window_size=0),
    )
    return base.replace_encoder(embed_dim=28, blocks=blocks)


def test_pruned_config_builds_runs_and_round_trips(tmp_path):
    config = _pruned_config()
    model = slimseg.build_model(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    attention = model.image_encoder.blocks[2].attn
    assert (attention.q.out_features, attention.v.out_features, attention.num_heads) == (12, 20, 2)
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (31, 9)
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        embedding = model.image_encoder(image)
    assert embedding.shape == (1, 256, 16, 16)

    path = slimseg.save_model(model, tmp_path / "pruned.safetensors")
    loaded = slimseg.load_model(path, device="cpu")
    assert loaded.config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(image), embedding, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_config_json_round_trip():
    config = _pruned_config()
    assert SamConfig.from_json(config.to_json()) == config
    assert SamConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(blocks=(BlockConfig(num_heads=5, qk_dim=48, v_dim=48, mlp_dim=96),)), "not a multiple of num_heads"),
        (dict(blocks=(BlockConfig(num_heads=4, qk_dim=48, v_dim=48, mlp_dim=0),)), "mlp_dim must be positive"),
        (dict(img_size=250), "not a multiple of patch_size"),
        (dict(blocks=()), "at least one block"),
    ],
)
def test_invalid_configs_are_refused(change, message):
    with pytest.raises(SlimsegError, match=message):
        dataclasses.replace(tiny_config(), image_encoder=dataclasses.replace(tiny_config().image_encoder, **change)).validate()


@pytest.mark.parametrize("text", ["{", '{"family": "lite"}', '{"image_encoder": {"embed_dim": 8}}', "[]"])
def test_invalid_config_json_is_refused(text):
    with pytest.raises(SlimsegError, match="config"):
        SamConfig.from_json(text)


def test_uniform_config_is_equivalent_to_windowless_global_attention_when_window_covers_grid():
    # A window as large as the grid is one window: the loader maps it to global attention.
    windowed = slimseg.build_model(tiny_config(window_size=16))
    global_ = slimseg.build_model(tiny_config(global_attn_indexes=(0, 1, 2, 3)))
    state = {k: torch.randn_like(v) * 0.05 for k, v in windowed.state_dict().items()}
    windowed.load_state_dict(state)
    global_.load_state_dict(state)
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(windowed.image_encoder(image), global_.image_encoder(image))
