"""Hugging Face transformers ``SamModel`` checkpoints (``vision_encoder.*`` keys) → slimseg.

SlimSAM-50/77 "uniform" are published this way (Zigeng/SlimSAM-uniform-50/-77). Key names
are mapped back to segment-anything's layout, then handled like any segment-anything state
dict; ``config.json``, when present, supplies what shapes cannot tell (decoder heads, eps).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from slimseg.errors import SlimsegError
from slimseg.modeling.sam import SamConfig

HF_MARKER_KEY = "vision_encoder.patch_embed.projection.weight"
_SHARED_PE_KEY = "shared_image_embedding.positional_embedding"

# (pattern, replacement) applied in order to every key; anchored so that decoder "layers"
# are not mistaken for encoder blocks.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^(image_encoder\.blocks\.\d+)\.layer_norm([12])\.", r"\1.norm\2."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm([1-4])\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
_HEAD_KEY = re.compile(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.(proj_in|proj_out|layers\.(\d+))\.(.+)$")


def looks_like_hf_state_dict(keys: Mapping[str, object] | set[str]) -> bool:
    return HF_MARKER_KEY in keys


def _rename_mlp_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MLP heads are proj_in, layers.0..n-1, proj_out; SAM's are layers.0..n+1."""
    hidden_counts: dict[str, int] = {}
    for key in state:
        match = _HEAD_KEY.match(key)
        if match and match.group(3) is not None:
            hidden_counts[match.group(1)] = max(hidden_counts.get(match.group(1), 0), int(match.group(3)) + 1)
    renamed = {}
    for key, tensor in state.items():
        match = _HEAD_KEY.match(key)
        if match is None:
            renamed[key] = tensor
            continue
        head, part, index, rest = match.groups()
        if part == "proj_in":
            position = 0
        elif part == "proj_out":
            position = hidden_counts.get(head, 0) + 1
        else:
            position = int(index) + 1
        renamed[f"{head}.layers.{position}.{rest}"] = tensor
    return renamed


def hf_to_sam_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF SamModel keys to segment-anything's (fused qkv is left for the caller to split)."""
    shared = state.get(_SHARED_PE_KEY)
    own = state.get("prompt_encoder.shared_embedding.positional_embedding")
    if shared is not None and own is not None and not torch.equal(shared, own):
        raise SlimsegError("checkpoint has two different prompt positional encodings; it is not a valid SamModel")
    renamed = {}
    for key, tensor in state.items():
        if key == _SHARED_PE_KEY:
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    if "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in renamed and shared is not None:
        renamed["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = shared
    return _rename_mlp_heads(renamed)


def hf_config_path(path: Path) -> Path:
    """Where a SamModel's ``config.json`` sits: in its folder, or beside its weights file."""
    return path / "config.json" if path.is_dir() else path.parent / "config.json"


def read_hf_config(path: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` beside a SamModel weights file (or in its folder), if any."""
    candidate = hf_config_path(path)
    if not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SlimsegError(f"{candidate}: unreadable config.json ({error})") from None
    if not isinstance(data, dict):
        raise SlimsegError(f"{candidate}: not a SamModel config (a JSON {type(data).__name__}, not an object)")
    if data.get("model_type", "sam") != "sam":
        raise SlimsegError(f"{candidate}: not a SamModel config (model_type {data.get('model_type')!r})")
    for section in ("vision_config", "mask_decoder_config"):
        if not isinstance(data.get(section) or {}, dict):
            raise SlimsegError(f"{candidate}: {section} must be a JSON object")
    return data


def _stated_number(config_json: Path, section: str, values: Mapping[str, Any], key: str, kind: type) -> Any:
    value = values.get(key)
    if value is None:
        return None
    # bool is an int subclass, and 7.0 heads or "8" are typos rather than numbers to round
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise SlimsegError(f"{config_json}: {section}.{key} must be {'a whole number' if kind is int else 'a number'}, "
                           f"got {value!r}")
    return kind(value)


def apply_hf_config(config: SamConfig, hf_config: Mapping[str, Any] | None, source: Path) -> SamConfig:
    """Take decoder heads and the encoder's LayerNorm eps from config.json; check the sizes it
    states against the ones read from the tensors. Every error names the config.json."""
    if not hf_config:
        return config
    where = hf_config_path(source)
    vision = hf_config.get("vision_config") or {}
    decoder_config = hf_config.get("mask_decoder_config") or {}
    encoder = config.image_encoder
    heads = {block.num_heads for block in encoder.blocks}
    facts = {  # what config.json may state -> what the tensors say
        "hidden_size": (encoder.embed_dim, "the weights are {} wide"),
        "num_hidden_layers": (encoder.depth, "the weights have {} blocks"),
        "patch_size": (encoder.patch_size, "the weights use {} px patches"),
        "image_size": (encoder.img_size, "the weights' position embedding is for {} px"),
        "output_channels": (encoder.out_chans, "the weights' neck has {} channels"),
        "num_attention_heads": (min(heads) if len(heads) == 1 else None, "the weights have {} heads per block"),
    }
    for key, (actual, description) in facts.items():
        stated = _stated_number(where, "vision_config", vision, key, int)
        if stated is not None and actual is not None and stated != actual:
            raise SlimsegError(f"{where}: vision_config.{key} is {stated} but {description.format(actual)}")
    stated_global = vision.get("global_attn_indexes")
    if stated_global is not None and stated_global != list(encoder.global_attn_indexes):
        raise SlimsegError(f"{where}: vision_config.global_attn_indexes is {stated_global} but the weights' "
                           f"global-attention blocks are {list(encoder.global_attn_indexes)}")
    eps = _stated_number(where, "vision_config", vision, "layer_norm_eps", float)
    if eps is not None and eps <= 0:
        raise SlimsegError(f"{where}: vision_config.layer_norm_eps must be positive, got {eps}")
    encoder = dataclasses.replace(encoder, norm_eps=encoder.norm_eps if eps is None else eps)
    decoder = config.mask_decoder
    decoder_heads = _stated_number(where, "mask_decoder_config", decoder_config, "num_attention_heads", int)
    if decoder_heads is not None:
        # every decoder attention splits the full width, the cross attentions a downsampled one
        widths = {decoder.transformer_dim, decoder.transformer_dim // decoder.attention_downsample_rate}
        if decoder_heads <= 0 or any(width % decoder_heads for width in widths):
            raise SlimsegError(f"{where}: mask_decoder_config.num_attention_heads {decoder_heads} does not divide "
                               f"the decoder's attention widths {sorted(widths)}")
        decoder = dataclasses.replace(decoder, transformer_num_heads=decoder_heads)
    try:
        return dataclasses.replace(config, image_encoder=encoder, mask_decoder=decoder).validate()
    except SlimsegError as error:
        raise SlimsegError(f"{where}: {error}") from None
