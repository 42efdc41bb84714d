"""SAM family: ViT image encoder with per-block widths, prompt encoder, mask decoder."""

from slimseg.modeling.sam.config import (
    BlockConfig,
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    sam_b_config,
    sam_h_config,
    sam_l_config,
    sam_vit_config,
)
from slimseg.modeling.sam.sam import Sam

__all__ = [
    "BlockConfig",
    "ImageEncoderConfig",
    "MaskDecoderConfig",
    "PromptEncoderConfig",
    "Sam",
    "SamConfig",
    "sam_b_config",
    "sam_h_config",
    "sam_l_config",
    "sam_vit_config",
]
