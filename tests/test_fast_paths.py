"""Every fast inference path against the plain float32 computation it replaces.

The parity tests (segment-anything, transformers) check the fast paths at full size against
the official code; these check each one alone, on tiny models, where it can be switched off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_tiny_model
from reference import real_photo
from test_train import tiny_lite_sam_config

import slimseg
import slimseg.inference.predictor as predictor_module
import slimseg.modeling.sam.image_encoder as image_encoder
import slimseg.modeling.sam.rel_pos as rel_pos
from slimseg.errors import SlimsegError
from slimseg.inference.precision import parse_dtype
from slimseg.modeling.sam.fast_paths import fast_paths_enabled, plain_compute
from slimseg.modeling.sam.native_attention import native_kernels_disabled


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(want.abs().max()), 1e-6)
    assert float((got - want).abs().max()) <= tolerance * scale


@pytest.mark.parametrize("batch, grid, head_dim", [(1, 16, 14), (6, 7, 16), (3, 5, 8)])
@pytest.mark.parametrize("budget", [64, 4096, 2**30])
def test_chunked_rel_pos_attention_matches_the_whole_bias(monkeypatch, batch, grid, head_dim, budget):
    """Chunks of rows (one global item), of whole windows, or everything at once, on torch's
    attention (tests/test_native_attention.py checks the native kernel)."""
    monkeypatch.setattr(rel_pos, "WINDOW_CHUNK_BYTES", budget)
    monkeypatch.setattr(rel_pos, "ROW_CHUNK_BYTES", budget)
    generator = torch.Generator().manual_seed(batch)
    q, k = (torch.randn(batch, 3, grid * grid, head_dim, generator=generator) for _ in range(2))
    v = torch.randn(batch, 3, grid * grid, head_dim + 5, generator=generator)
    table_h, table_w = (torch.randn(2 * grid - 1, head_dim, generator=generator) for _ in range(2))
    bias = rel_pos.decomposed_rel_pos_bias(q, table_h, table_w, (grid, grid))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=head_dim**-0.5)
    with torch.inference_mode(), native_kernels_disabled():
        got = rel_pos.rel_pos_attention(q, k, v, table_h, table_w, (grid, grid), head_dim**-0.5)
    _close(got, want, 1e-5)
    # laid out as fused attention returns it, so that merging the heads is a view
    assert got.transpose(1, 2).is_contiguous()


def test_chunked_encoder_mlp_matches_the_plain_computation(monkeypatch):
    """SAM-B's MLP runs on token chunks; a tiny budget makes the tiny model's do the same."""
    monkeypatch.setattr(image_encoder, "MLP_CHUNK_BYTES", 50 * 96 * 4)  # 50 tokens of 96 hidden floats
    model = _model("sam")
    image = torch.rand(1, 3, model.img_size, model.img_size) * 255
    with torch.inference_mode():
        fast = model.image_encoder(model.preprocess(image))
        with plain_compute():
            plain = model.image_encoder(model.preprocess(image))
    _close(fast, plain)


def test_rel_pos_attention_keeps_the_whole_bias_for_autograd():
    q = torch.randn(1, 2, 16, 4, requires_grad=True)
    table = torch.randn(7, 4, requires_grad=True)
    out = rel_pos.rel_pos_attention(q, q, q, table, table, (4, 4), 0.5)
    out.sum().backward()
    assert q.grad is not None and table.grad is not None and float(table.grad.abs().sum()) > 0


def test_plain_compute_switches_the_fast_paths_off_and_back():
    assert fast_paths_enabled()
    with plain_compute():
        assert not fast_paths_enabled()
        with plain_compute():
            assert not fast_paths_enabled()
        assert not fast_paths_enabled()
    assert fast_paths_enabled()


def _prompts(count: int, generator: torch.Generator, points: int) -> dict[str, torch.Tensor]:
    corner = torch.rand(count, 2, generator=generator) * 150
    return dict(
        point_coords=torch.rand(count, points, 2, generator=generator) * 250,
        point_labels=(torch.rand(count, points, generator=generator) > 0.3).int(),
        boxes=torch.cat([corner, corner + 20 + torch.rand(count, 2, generator=generator) * 80], 1),
    )


def _model(kind: str) -> torch.nn.Module:
    if kind == "sam":
        return random_tiny_model(3)
    model = slimseg.build_model(tiny_lite_sam_config())
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kind", ["sam", "lite-sam"])
@pytest.mark.parametrize("count", [1, 5])
@pytest.mark.parametrize("multimask", [True, False])
def test_encoder_and_decoder_match_the_plain_computation(kind, count, multimask):
    """Points, boxes, both, per-prompt masks and one shared mask; few points (the folded
    projections) and many (the plain projections)."""
    model = _model(kind)
    image = torch.rand(1, 3, model.img_size, model.img_size) * 255
    generator = torch.Generator().manual_seed(count)
    low_res_size = [4 * side for side in model.prompt_encoder.image_embedding_size]
    masks = torch.randn(count, 1, *low_res_size, generator=generator)
    cases = [
        dict(points=2, use=("point_coords", "point_labels")),
        dict(points=1, use=("boxes",)),
        dict(points=2, use=("point_coords", "point_labels", "boxes")),
        dict(points=30, use=("point_coords", "point_labels")),
        dict(points=1, use=("boxes",), masks=masks),
        dict(points=1, use=("boxes",), masks=masks[:1]),
    ]

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            embedding = model.image_encoder(model.preprocess(image))
            outputs = [embedding]
            for case in cases:
                prompts = _prompts(count, torch.Generator().manual_seed(case["points"]), case["points"])
                points = (prompts["point_coords"], prompts["point_labels"]) if "point_coords" in case["use"] else None
                boxes = prompts["boxes"] if "boxes" in case["use"] else None
                sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=case.get("masks"))
                outputs += model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
            return outputs

    fast = run()
    with plain_compute():
        plain = run()
    for got, want in zip(fast, plain):
        _close(got, want)


def test_decoder_gradients_match_the_plain_computation():
    """Training goes through the same fast decoder paths: the gradients agree too."""
    model = _model("sam").train()
    embedding = torch.randn(1, 256, 16, 16)
    prompts = _prompts(3, torch.Generator().manual_seed(0), 2)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        sparse, dense = model.prompt_encoder(points=(prompts["point_coords"], prompts["point_labels"]), boxes=None,
                                             masks=None)
        masks, iou = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        (masks.square().mean() + iou.sum()).backward()
        return {name: p.grad.clone() for name, p in model.mask_decoder.named_parameters() if p.grad is not None}

    fast = gradients()
    with plain_compute():
        plain = gradients()
    assert fast.keys() <= plain.keys() and len(fast) > 20
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-3, atol=1e-6)
    # Folding drops the key bias of prompt→image attention (it shifts every logit of a query
    # alike, so the softmax ignores it): its gradient is zero in the plain graph too.
    for name in plain.keys() - fast.keys():
        assert "token_to_image.k_proj.bias" in name
        assert float(plain[name].abs().max()) < 1e-6


def test_predictor_decodes_many_prompts_in_chunks_with_the_same_results(monkeypatch):
    predictor = slimseg.Predictor(_model("sam"))
    predictor.set_image(real_photo())
    prompts = _prompts(7, torch.Generator().manual_seed(1), 1)
    boxes = torch.as_tensor(predictor.transform.apply_boxes(prompts["boxes"].numpy(), predictor.original_size))
    shared_mask = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    whole = [predictor.predict_low_res(None, None, boxes), predictor.predict_low_res(None, None, boxes, shared_mask)]
    per_prompt = 8 * predictor.features[0].numel()
    monkeypatch.setattr(predictor_module, "DECODER_CHUNK_BYTES", 3 * per_prompt)
    assert predictor._decoder_chunk() == 3
    chunked = [predictor.predict_low_res(None, None, boxes), predictor.predict_low_res(None, None, boxes, shared_mask)]
    for got, want in zip(chunked, whole):
        for got_part, want_part in zip(got, want):
            _close(got_part, want_part, 1e-5)
    assert not torch.allclose(whole[0][0], whole[1][0])  # the mask made a difference


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.08), ("float16", 0.01)])
def test_low_precision_predictor_stays_near_float32(dtype, tolerance):
    model = _model("sam")
    reference, low = slimseg.Predictor(model), slimseg.Predictor(model, dtype=dtype)
    for predictor in (reference, low):
        predictor.set_image(real_photo())
    assert low.dtype == parse_dtype(dtype)
    _close(low.get_image_embedding(), reference.get_image_embedding(), tolerance)
    box = np.array([100.0, 90.0, 420.0, 500.0])
    (_, want_iou, want), (_, got_iou, got) = (p.predict(box=box, return_logits=True) for p in (reference, low))
    assert got.dtype == np.float32 and got_iou.dtype == np.float32
    _close(torch.from_numpy(got), torch.from_numpy(want), tolerance)


@pytest.mark.parametrize("name", ["float64", "half-ish", "int8"])
def test_unknown_dtype_is_refused(name):
    with pytest.raises(SlimsegError, match="dtype"):
        slimseg.Predictor(_model("sam"), dtype=name)


def test_mask_generator_passes_its_dtype_on():
    generator = slimseg.MaskGenerator(_model("sam"), points_per_side=4, dtype="bfloat16")
    assert generator.predictor.dtype == torch.bfloat16
