"""Builders for segment-anything reference models with the same weights as slimseg's."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from slimseg.modeling.sam import SamConfig


def reference_sam(config: SamConfig) -> Sam:
    """segment-anything's Sam with the architecture of a uniform (unpruned-shape) config."""
    encoder = config.image_encoder
    block = encoder.blocks[0]
    windows = {b.window_size for b in encoder.blocks if not b.is_global}
    grid = encoder.grid_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=encoder.img_size,
            patch_size=encoder.patch_size,
            embed_dim=encoder.embed_dim,
            depth=encoder.depth,
            num_heads=block.num_heads,
            mlp_ratio=block.mlp_dim / encoder.embed_dim,
            out_chans=encoder.out_chans,
            qkv_bias=encoder.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=windows.pop() if windows else 0,
            global_attn_indexes=encoder.global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(encoder.img_size, encoder.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    ).eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every tensor (zero-initialised position tables included) random values, so that
    every weight influences the outputs; returns the state dict."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        scale = 1.0 if "gaussian_matrix" in key else 0.02 if tensor.dim() > 1 else 0.1
        base = 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm4.weight")) else 0.0
        state[key] = base + scale * noise
    model.load_state_dict(state)
    return state
