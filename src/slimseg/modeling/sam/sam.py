"""The SAM model: encoders and decoder plus SAM's own pre- and post-processing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.modeling.sam.config import SamConfig
from slimseg.modeling.sam.image_encoder import ImageEncoderViT
from slimseg.modeling.sam.mask_decoder import MaskDecoder
from slimseg.modeling.sam.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """A SAM-family model built from a :class:`SamConfig`.

    Attributes mirror segment-anything's ``Sam`` (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``, ``mask_threshold``, ``image_format``) so that code written for it works.
    """

    image_format = "RGB"

    def __init__(self, config: SamConfig, image_encoder: nn.Module | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        encoder_config = config.image_encoder
        self.image_encoder = image_encoder if image_encoder is not None else ImageEncoderViT(encoder_config)
        grid = encoder_config.grid_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_encoder.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(encoder_config.img_size, encoder_config.img_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(config.mask_decoder)
        self.mask_threshold = config.mask_threshold
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """Side of the square encoder input (1024 for SAM)."""
        return self.config.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) 0-255 pixels and zero-pad bottom/right to img_size²."""
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.img_size - x.shape[-1], 0, self.img_size - x.shape[-2]))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale (B, C, 4h, 4w) low-res logits to the padded input, crop the padding, resize
        to the original (H, W): returns (B, C, H, W) logits."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
