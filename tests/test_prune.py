"""SlimSAM-style pruning of the image encoder (slimseg.compress.prune / importance)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_tiny_model, tiny_config

import slimseg
from slimseg.compress.importance import accumulate_disturbed_gradients, make_importance
from slimseg.compress.prune import count_parameters, prune_image_encoder
from slimseg.errors import SlimsegError
from slimseg.modeling.sam.config import sam_b_config
from slimseg.modeling.sam.image_encoder import Attention
from slimseg.zoo.sam_layout import infer_sam_config


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # On a busy 2-core machine the second thread's synchronisation made the tiny models up to
    # 60x slower and SAM-B's tracing slower too (27 s with one thread, 37 s with two).
    torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> slimseg.Sam:
    """A tiny SAM whose pos_embed and rel-pos tables are random (they start as zeros)."""
    torch.manual_seed(seed)
    model = slimseg.build_model(tiny_config())
    with torch.no_grad():
        model.image_encoder.pos_embed.normal_(0, 0.5)
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    return model


def images(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randn(1, 3, 256, 256, generator=generator) for _ in range(count)]


def embed(model: slimseg.Sam, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.image_encoder(x)


def widths(model: slimseg.Sam) -> tuple[int, list[int], list[int], list[int]]:
    encoder = model.image_encoder
    blocks = list(encoder.blocks)
    return (
        encoder.patch_embed.proj.out_channels,
        [b.attn.q.out_features for b in blocks],
        [b.attn.v.out_features for b in blocks],
        [b.mlp.lin1.out_features for b in blocks],
    )


def assert_config_matches(model: slimseg.Sam, report) -> None:
    """The report's config is the model's and agrees with the widths read from the weights."""
    assert model.config == report.config
    inferred = infer_sam_config(model.state_dict()).image_encoder
    assert inferred.embed_dim == report.config.image_encoder.embed_dim
    assert inferred.blocks == report.config.image_encoder.blocks


def test_embedding_stage_prunes_only_the_residual_width(tmp_path) -> None:
    model = tiny_model()
    tables = [b.attn.rel_pos_h.detach().clone() for b in model.image_encoder.blocks]
    report = prune_image_encoder(model, 0.5, "embedding")
    assert widths(model) == (24, [48] * 4, [48] * 4, [96] * 4)
    assert model.image_encoder.pos_embed.shape == (1, 16, 16, 24)
    assert model.image_encoder.neck[0].weight.shape == (256, 24, 1, 1)
    for block, table in zip(model.image_encoder.blocks, tables):
        assert block.attn.num_heads == 4 and block.attn.use_rel_pos
        assert torch.equal(block.attn.rel_pos_h, table)
    assert report.config.image_encoder.embed_dim == 24 and report.rel_pos_reset_blocks == ()
    assert report.params_after == count_parameters(model.image_encoder) < report.params_before
    assert_config_matches(model, report)

    x = images(1)[0]
    out = embed(model, x)
    assert out.shape == (1, 256, 16, 16)
    path = slimseg.save_model(model, tmp_path / "pruned.safetensors")
    loaded = slimseg.load_model(path, device="cpu")
    assert loaded.config == report.config
    assert torch.equal(embed(loaded, x), out)


class _FixedScaleAttention(Attention):
    """Attention with a given logit scale, to compare zeroed channels with removed ones."""

    fixed_scale: float

    @property
    def scale(self) -> float:
        return self.fixed_scale


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    return [int((original == row).all(dim=1).nonzero()) for row in pruned]


def test_bottleneck_stage_slices_rel_pos_and_keeps_function() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    report = prune_image_encoder(model, 0.5, "bottleneck", importance=make_importance("magnitude"))
    assert widths(model) == (48, [24] * 4, [24] * 4, [48] * 4)
    assert report.rel_pos_reset_blocks == ()
    assert_config_matches(model, report)

    # The reference keeps every channel but zeroes the removed ones; with the pruned logit
    # scale it must compute exactly what the pruned model computes, rel-pos terms included.
    for block, ref in zip(model.image_encoder.blocks, reference.image_encoder.blocks):
        attn, ref_attn = block.attn, ref.attn
        assert attn.num_heads == 4 and attn.scale == pytest.approx(6**-0.5)
        assert attn.rel_pos_h.shape[1] == attn.rel_pos_w.shape[1] == 6
        kept_q = _kept_rows(attn.q.weight, ref_attn.q.weight)
        assert kept_q == _kept_rows(attn.k.weight, ref_attn.k.weight)
        offsets = [[i - h * 12 for i in kept_q if h * 12 <= i < (h + 1) * 12] for h in range(4)]
        assert all(o == offsets[0] for o in offsets), "heads must keep the same offsets"
        with torch.no_grad():
            for name in "qkv":
                layer = getattr(ref_attn, name)
                kept = _kept_rows(getattr(attn, name).weight, layer.weight)
                dropped = [i for i in range(layer.out_features) if i not in kept]
                layer.weight[dropped] = 0
                layer.bias[dropped] = 0
            kept_mlp = _kept_rows(block.mlp.lin1.weight, ref.mlp.lin1.weight)
            dropped_mlp = [i for i in range(96) if i not in kept_mlp]
            ref.mlp.lin1.weight[dropped_mlp] = 0
            ref.mlp.lin1.bias[dropped_mlp] = 0  # GELU(0) = 0
        assert torch.equal(attn.rel_pos_h, ref_attn.rel_pos_h[:, offsets[0]])
        ref_attn.__class__ = _FixedScaleAttention
        ref_attn.fixed_scale = attn.scale
    x = images(1)[0]
    torch.testing.assert_close(embed(model, x), embed(reference, x), atol=1e-5, rtol=1e-5)


def test_global_bottleneck_gives_unequal_widths_in_head_multiples() -> None:
    model = tiny_model()
    with torch.no_grad():
        # Blocks 0 and 1: three quarters of the head offsets and MLP units are near-silent,
        # so a global ranking takes them first and prunes these blocks hardest.
        for block in list(model.image_encoder.blocks)[:2]:
            weak = torch.tensor([h * 12 + o for h in range(4) for o in range(9)])
            for name in "qkv":
                getattr(block.attn, name).weight[weak] *= 0.01
            block.attn.proj.weight[:, weak] *= 0.01
            block.mlp.lin1.weight[:72] *= 0.01
            block.mlp.lin2.weight[:, :72] *= 0.01
    report = prune_image_encoder(model, 0.5, "bottleneck", mode="global")
    _, qk, v, mlp = widths(model)
    assert qk == v and len(set(qk)) > 1 and len(set(mlp)) > 1
    assert all(w % 4 == 0 and w > 0 for w in qk + mlp)
    assert qk[:2] == [12, 12] and mlp[:2] == [24, 24]
    assert sum(qk) == 96 and sum(mlp) <= 192
    assert report.rel_pos_reset_blocks == ()
    assert_config_matches(model, report)
    assert embed(model, images(1)[0]).shape == (1, 256, 16, 16)


@pytest.mark.parametrize("importance", ["magnitude", "random"])
@pytest.mark.parametrize("stage", ["bottleneck", "both"])
@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.88, 0.9])
def test_kept_widths_meet_the_budget_at_every_ratio(ratio, mode, stage, importance) -> None:
    # Global pruning at 0.88-0.9 used to leave whole blocks (q/k [48, 12, 4, 4]) and overshoot.
    model = random_tiny_model(0)
    torch.manual_seed(0)
    criterion = make_importance(importance, normalizer="gaussian" if mode == "global" else "mean")
    for step in ("embedding", "bottleneck") if stage == "both" else ("bottleneck",):
        prune_image_encoder(model, ratio, step, mode=mode, importance=criterion)
    embedding, qk, v, mlp = widths(model)
    assert qk == v and all(w % 4 == 0 and w > 0 for w in qk + mlp)
    scopes = ([[embedding], 48],) if stage == "both" else ()
    for kept, width in scopes + ((qk, 48), (mlp, 96)):
        # Rounding to the 4 heads may cost under 4 channels of each budget: every block's own
        # budget when local, the blocks' shared one when global.
        budgets = [(k, width * (1 - ratio)) for k in kept] if mode == "local" else [
            (sum(kept), width * len(kept) * (1 - ratio))]
        for total, budget in budgets:
            assert budget - 4 < total <= budget + 1e-9, (kept, ratio)


def test_global_ratio_beyond_the_per_block_floors_names_the_highest_reachable() -> None:
    model = tiny_model()
    # 4 blocks x 1 of 12 q/k/v offsets must stay: at most 1 - 4/48 = 0.91666 can go.
    with pytest.raises(SlimsegError, match=r"highest reachable ratio is 0\.9166$"):
        prune_image_encoder(model, 0.92, "bottleneck", mode="global")
    assert widths(model) == (48, [48] * 4, [48] * 4, [96] * 4)
    prune_image_encoder(model, 0.9166, "bottleneck", mode="global")
    assert widths(model)[1] == [4] * 4 and sum(widths(model)[3]) == 32


def test_ratio_zero_changes_nothing() -> None:
    model = tiny_model()
    x = images(1)[0]
    before = embed(model, x)
    config = model.config
    report = prune_image_encoder(model, 0, "bottleneck")
    assert report.params_after == report.params_before and report.config is config is model.config
    assert torch.equal(embed(model, x), before)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), True])
def test_invalid_ratio_is_a_user_error(ratio) -> None:
    with pytest.raises(SlimsegError, match="ratio"):
        prune_image_encoder(tiny_model(), ratio, "embedding")


def test_invalid_stage_mode_and_too_high_ratio_are_user_errors() -> None:
    model = tiny_model()
    with pytest.raises(SlimsegError, match="stage"):
        prune_image_encoder(model, 0.5, "heads")
    with pytest.raises(SlimsegError, match="mode"):
        prune_image_encoder(model, 0.5, "embedding", mode="uniform")
    with pytest.raises(SlimsegError, match="leaves no channels"):
        prune_image_encoder(model, 0.95, "embedding")  # 48 * 0.05 = 2 < 4 heads
    assert widths(model) == (48, [48] * 4, [48] * 4, [96] * 4)


def test_unknown_importance_lists_choices() -> None:
    with pytest.raises(SlimsegError, match="disturbed-taylor, taylor, magnitude, random"):
        make_importance("hessian")


def test_disturbed_gradients_sum_over_images_whatever_the_batching() -> None:
    model = tiny_model()
    encoder = model.image_encoder
    batches = images(2)
    noise = torch.Generator().manual_seed(7)
    assert accumulate_disturbed_gradients(encoder, encoder, batches, generator=noise) == 2
    one_by_one = encoder.patch_embed.proj.weight.grad.clone()
    assert one_by_one.abs().sum() > 0
    noise = torch.Generator().manual_seed(7)
    assert accumulate_disturbed_gradients(encoder, encoder, [torch.cat(batches)], generator=noise) == 2
    torch.testing.assert_close(encoder.patch_embed.proj.weight.grad, one_by_one, atol=1e-7, rtol=1e-3)


def test_disturbed_taylor_keeps_the_embedding_closer_than_random() -> None:
    teacher = tiny_model()
    data = images(3)

    def error(importance_name: str, seed: int) -> float:
        student = copy.deepcopy(teacher)
        if importance_name == "disturbed-taylor":
            noise = torch.Generator().manual_seed(seed)
            accumulate_disturbed_gradients(student.image_encoder, teacher.image_encoder, data, generator=noise)
        torch.manual_seed(seed)
        prune_image_encoder(student, 0.5, "embedding", importance=make_importance(importance_name))
        return sum(float(torch.mean((embed(student, x) - embed(teacher, x)) ** 2)) for x in data) / len(data)

    random_errors = [error("random", seed) for seed in range(3)]
    assert error("disturbed-taylor", 0) < sum(random_errors) / len(random_errors)


def test_plain_taylor_needs_a_student_that_differs_from_its_teacher() -> None:
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    data = images(1)
    taylor = make_importance("taylor")
    with pytest.raises(SlimsegError, match="has none"):
        prune_image_encoder(student, 0.5, "embedding", importance=taylor)
    for reference in (student, teacher):
        with pytest.raises(SlimsegError, match="student equals its teacher"):
            accumulate_disturbed_gradients(student.image_encoder, reference.image_encoder, data, sigma=0.0)
    accumulate_disturbed_gradients(student.image_encoder, teacher.image_encoder, data)
    student.image_encoder.zero_grad(set_to_none=False)
    with pytest.raises(SlimsegError, match="all gradients are zero"):
        prune_image_encoder(student, 0.5, "embedding", importance=taylor)
    assert widths(student)[0] == 48

    # After the first stage the student differs, so the plain loss ranks the bottleneck.
    prune_image_encoder(student, 0.5, "embedding")
    accumulate_disturbed_gradients(student.image_encoder, teacher.image_encoder, data, sigma=0.0)
    prune_image_encoder(student, 0.5, "bottleneck", importance=taylor)
    assert widths(student) == (24, [24] * 4, [24] * 4, [48] * 4)


@pytest.mark.slow
def test_sam_b_at_ratio_077_matches_slimsam_77_uniform() -> None:
    model = slimseg.build_model(sam_b_config())
    first = prune_image_encoder(model, 0.77, "embedding")
    assert first.params_before == 89_670_912
    second = prune_image_encoder(model, 0.77, "bottleneck")
    assert widths(model) == (168, [168] * 12, [168] * 12, [696] * 12)
    assert {tuple(b.attn.rel_pos_h.shape) for b in model.image_encoder.blocks} == {(27, 14), (127, 14)}
    assert second.params_after == 5_658_968
    assert second.rel_pos_reset_blocks == ()


def test_rel_pos_tables_fall_back_to_zeros_when_heads_keep_different_offsets(monkeypatch) -> None:
    from slimseg.compress import prune

    assert prune._kept_offsets([0, 1, 4], head_dim=3, num_heads=2) is None  # head 1 lost offset 1
    assert prune._kept_offsets([0, 3], head_dim=3, num_heads=2) == [1, 2]
    monkeypatch.setattr(prune, "_kept_offsets", lambda removed, head_dim, num_heads: None)
    model = tiny_model()
    report = prune_image_encoder(model, 0.5, "bottleneck")
    assert report.rel_pos_reset_blocks == (0, 1, 2, 3)
    for block in model.image_encoder.blocks:
        assert block.attn.rel_pos_h.shape[1] == 6 and not block.attn.rel_pos_h.any()
    assert embed(model, images(1)[0]).shape == (1, 256, 16, 16)


def test_frozen_encoder_is_pruned_and_stays_frozen() -> None:
    model = tiny_model()
    model.image_encoder.requires_grad_(False)
    prune_image_encoder(model, 0.5, "bottleneck")
    assert widths(model) == (48, [24] * 4, [24] * 4, [48] * 4)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_prunes_a_model_in_its_own_dtype(dtype) -> None:
    model = tiny_model().to(dtype)
    report = prune_image_encoder(model, 0.5, "bottleneck", importance="magnitude")  # a name, as the CLI gives
    assert report.params_after < report.params_before
    assert embed(model, images(1)[0].to(dtype)).dtype == dtype


def test_numbers_names_and_tracing_inputs_are_checked_before_tracing() -> None:
    for ratio in (np.float32(0.5), torch.tensor(0.5)):
        assert prune_image_encoder(tiny_model(), ratio, "embedding").ratio == 0.5
    with pytest.raises(SlimsegError, match=r"pruning ratio must be a finite number in \[0, 1\), got '0.5'"):
        prune_image_encoder(tiny_model(), "0.5", "embedding")
    with pytest.raises(SlimsegError, match="unknown importance 'l2'"):
        prune_image_encoder(tiny_model(), 0.5, "embedding", importance="l2")
    with pytest.raises(SlimsegError, match=r"example_input must be a \(1, 3, 256, 256\) tensor"):
        prune_image_encoder(tiny_model(), 0.5, "bottleneck", example_input=torch.zeros(1, 3, 128, 128))
    with pytest.raises(SlimsegError, match="meta device"):
        prune_image_encoder(tiny_model().to("meta"), 0.5, "bottleneck")
    model = tiny_model()
    for sigma in (float("nan"), float("inf"), -1.0, "0.01"):
        with pytest.raises(SlimsegError, match="sigma must be"):
            accumulate_disturbed_gradients(model.image_encoder, copy.deepcopy(model).image_encoder, images(1), sigma)
