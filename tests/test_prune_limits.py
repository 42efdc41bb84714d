"""The highest reachable pruning ratio: exact for every stage and mode, named when a ratio is
out of reach (a usage error), and for alternate slimming the ceiling of the whole plan."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import slimseg
from slimseg.compress.prune import prune_image_encoder
from slimseg.compress.ratio_limits import RatioOutOfReach, check_ratio_reachable, highest_ratio
from slimseg.compress.slimming import SlimmingPlan
from slimseg.errors import UsageError


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine (see test_prune.py)


@pytest.mark.parametrize("overrides", [{}, {"mlp_dim": 10}, {"embed_dim": 40, "num_heads": 2}])
@pytest.mark.parametrize(("stage", "mode"), [("embedding", "local"), ("bottleneck", "local"),
                                             ("bottleneck", "global")])
def test_the_highest_reachable_ratio_is_reachable_and_the_next_is_not(overrides, stage, mode) -> None:
    encoder = slimseg.build_model(tiny_config(**overrides)).image_encoder
    heads = encoder.blocks[0].attn.num_heads
    highest = highest_ratio(encoder, stage, mode, heads)
    assert 0.5 < highest < 1
    check_ratio_reachable(encoder, highest, stage, mode, heads)
    beyond = round(highest + 1e-4, 4)
    with pytest.raises(RatioOutOfReach, match=rf"highest reachable ratio is {highest}$") as error:
        check_ratio_reachable(encoder, beyond, stage, mode, heads)
    assert isinstance(error.value, UsageError) and error.value.highest == highest


def test_local_float_rounding_lowers_the_highest_ratio() -> None:
    # 1 - 1/10 = 0.9, but 10 * (1 - 0.9) floors to 0 kept channels: 0.8999 is the highest
    encoder = slimseg.build_model(tiny_config(mlp_dim=10, embed_dim=80, num_heads=2)).image_encoder
    assert highest_ratio(encoder, "bottleneck", "local", 2) == 0.8999


def test_local_pruning_at_the_highest_ratio_keeps_the_floor() -> None:
    model = slimseg.build_model(tiny_config())
    with pytest.raises(UsageError, match="leaves no channels of the 48-wide embedding width, so the highest "
                                         r"reachable ratio is 0\.9166$"):
        prune_image_encoder(model, 0.92, "embedding")
    prune_image_encoder(model, 0.9166, "embedding")
    assert model.image_encoder.patch_embed.proj.out_channels == 4  # one head count of channels


def test_alternate_slimming_names_the_ceiling_of_every_stage() -> None:
    # after bottleneck pruning (head dim 12 -> 6) the embedding (48 wide) could still reach
    # 0.9166, but the plan's bottleneck step only 1 - 1/6: the message must give the lower one
    model = slimseg.build_model(tiny_config())
    prune_image_encoder(model, 0.5, "bottleneck")
    assert model.image_encoder.blocks[0].attn.q.out_features == 24
    plan = SlimmingPlan(ratio=0.95, importance="magnitude", distill_epochs=0)
    with pytest.raises(RatioOutOfReach, match=r"48-wide embedding width, so the highest reachable ratio is 0\.8333$"):
        plan.check(model)
    SlimmingPlan(ratio=0.8333, importance="magnitude", distill_epochs=0).check(model)
