"""segment-anything's state-dict layout: fused ``attn.qkv`` ⇄ slimseg's split q/k/v, and the
architecture read back from tensor shapes.

Widths are always taken from the tensors, never from a model name: SlimSAM's "uniform"
checkpoints use this very layout with pruned widths.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from slimseg.errors import SlimsegError
from slimseg.modeling.sam.config import (
    GLOBAL_ATTENTION,
    BlockConfig,
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
)

StateDict = dict[str, torch.Tensor]

ENCODER_PREFIX = "image_encoder."
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
_DECODER_LAYER_KEY = re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.")
_IOU_HEAD_KEY = re.compile(r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight$")
# SAM's decoder heads cannot be read from shapes; every published SAM-family model uses 8.
SAM_DECODER_HEADS = 8


def looks_like_sam_state_dict(keys: set[str] | Mapping[str, object]) -> bool:
    return "image_encoder.patch_embed.proj.weight" in keys and "mask_decoder.iou_token.weight" in keys


def split_fused_qkv(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Replace every ``attn.qkv.{weight,bias}`` by ``attn.{q,k,v}.{weight,bias}``.

    The fused layer's output rows are [q; k; v], each over all heads, so an equal three-way
    split along dim 0 recovers them exactly.
    """
    result: StateDict = {}
    for key, tensor in state_dict.items():
        if ".attn.qkv." not in key:
            result[key] = tensor
            continue
        if tensor.shape[0] % 3:
            raise SlimsegError(f"fused tensor {key} has {tensor.shape[0]} rows, not a multiple of 3")
        prefix, suffix = key.split(".attn.qkv.")
        for name, part in zip("qkv", tensor.chunk(3, dim=0)):
            result[f"{prefix}.attn.{name}.{suffix}"] = part.contiguous()
    return result


def fuse_qkv(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of :func:`split_fused_qkv`, for writing segment-anything-format checkpoints."""
    result: StateDict = {}
    for key, tensor in state_dict.items():
        match = re.match(r"^(.*)\.attn\.([qkv])\.(weight|bias)$", key)
        if match is None or not key.startswith(ENCODER_PREFIX):
            result[key] = tensor
            continue
        prefix, name, suffix = match.groups()
        if name != "q":
            continue
        parts = [state_dict[f"{prefix}.attn.{n}.{suffix}"] for n in "qkv"]
        if len({p.shape[0] for p in parts}) != 1:
            raise SlimsegError(f"{prefix}: q/k/v widths differ, which the fused qkv layout cannot hold")
        result[f"{prefix}.attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
    return result


def _count(keys: set[str], pattern: re.Pattern[str]) -> int:
    indexes = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if indexes != set(range(len(indexes))):
        raise SlimsegError(f"checkpoint has non-contiguous layer indexes {sorted(indexes)}")
    return len(indexes)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    try:
        return state_dict[key].shape
    except KeyError:
        raise SlimsegError(f"checkpoint is missing tensor {key}") from None


def _infer_block(state_dict: Mapping[str, torch.Tensor], index: int, grid: int) -> BlockConfig:
    prefix = f"image_encoder.blocks.{index}."
    qk_dim = _shape(state_dict, prefix + "attn.q.weight")[0]
    v_dim = _shape(state_dict, prefix + "attn.v.weight")[0]
    mlp_dim = _shape(state_dict, prefix + "mlp.lin1.weight")[0]
    rel_key = prefix + "attn.rel_pos_h"
    if rel_key not in state_dict:
        raise SlimsegError(
            "checkpoint has no relative-position tables, so its attention heads cannot be read from "
            "the tensor shapes; save it in slimseg's format with its config"
        )
    table_length, head_dim = state_dict[rel_key].shape
    if head_dim == 0 or qk_dim % head_dim:
        raise SlimsegError(f"{rel_key}: head dim {head_dim} does not divide the q width {qk_dim}")
    attention_size = (table_length + 1) // 2
    # A window as large as the token grid is one window: identical to global attention.
    window = GLOBAL_ATTENTION if attention_size >= grid else attention_size
    return BlockConfig(num_heads=qk_dim // head_dim, qk_dim=qk_dim, v_dim=v_dim, mlp_dim=mlp_dim, window_size=window)


def infer_sam_config(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Read the exact architecture of a SAM-layout state dict (split q/k/v) from its shapes."""
    keys = set(state_dict)
    embed_dim, _, patch_size, _ = _shape(state_dict, "image_encoder.patch_embed.proj.weight")
    use_abs_pos = "image_encoder.pos_embed" in keys
    grid = _shape(state_dict, "image_encoder.pos_embed")[1] if use_abs_pos else 1024 // patch_size
    depth = _count(keys, _BLOCK_KEY)
    blocks = tuple(_infer_block(state_dict, i, grid) for i in range(depth))
    encoder = ImageEncoderConfig(
        embed_dim=embed_dim,
        blocks=blocks,
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=_shape(state_dict, "image_encoder.patch_embed.proj.weight")[1],
        out_chans=_shape(state_dict, "image_encoder.neck.0.weight")[0],
        qkv_bias="image_encoder.blocks.0.attn.q.bias" in keys,
        use_abs_pos=use_abs_pos,
    )
    prompt = PromptEncoderConfig(
        embed_dim=_shape(state_dict, "prompt_encoder.point_embeddings.0.weight")[1],
        mask_in_chans=_shape(state_dict, "prompt_encoder.mask_downscaling.3.weight")[0],
    )
    transformer_dim = _shape(state_dict, "mask_decoder.iou_token.weight")[1]
    cross_width = _shape(state_dict, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")[0]
    decoder = MaskDecoderConfig(
        transformer_dim=transformer_dim,
        transformer_depth=_count(keys, _DECODER_LAYER_KEY),
        transformer_mlp_dim=_shape(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        transformer_num_heads=SAM_DECODER_HEADS,
        attention_downsample_rate=transformer_dim // cross_width,
        num_multimask_outputs=_shape(state_dict, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(keys, _IOU_HEAD_KEY),
        iou_head_hidden_dim=_shape(state_dict, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )
    return SamConfig(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).validate()
