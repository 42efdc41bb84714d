"""The SAM model: encoders and decoder plus SAM's own pre- and post-processing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.errors import SlimsegError
from slimseg.modeling.autoppn import AutoPPN, AutoPPNConfig, PointProposals
from slimseg.modeling.sam.config import MaskDecoderConfig, PromptEncoderConfig, SamConfig
from slimseg.modeling.sam.image_encoder import ImageEncoderViT
from slimseg.modeling.sam.mask_decoder import MaskDecoder
from slimseg.modeling.sam.prompt_encoder import PromptEncoder


class PromptableSegmenter(nn.Module):
    """What every model family shares: an image encoder producing a (B, C, h, w) embedding,
    SAM's prompt encoder and a mask decoder, and SAM's pre- and post-processing.

    Attributes mirror segment-anything's ``Sam`` (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``, ``mask_threshold``, ``image_format``) so that code written for it works.
    """

    image_format = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        img_size: int,
        embedding_size: int,
        prompt_encoder: PromptEncoderConfig,
        mask_decoder: MaskDecoderConfig,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        mask_threshold: float,
        autoppn: AutoPPNConfig | None = None,
    ) -> None:
        super().__init__()
        self.img_size = img_size  # side of the square encoder input
        self.image_encoder = image_encoder
        self.prompt_encoder = PromptEncoder(
            embed_dim=prompt_encoder.embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(img_size, img_size),
            mask_in_chans=prompt_encoder.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(mask_decoder)
        self.mask_threshold = mask_threshold
        self.autoppn = AutoPPN(autoppn) if autoppn is not None else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def propose_points(
        self, embedding: torch.Tensor, valid_size: tuple[int, int] | None = None
    ) -> list[PointProposals]:
        """AutoPPN point prompts (input-frame xy) for a (B, C, h, w) embedding; ``valid_size``
        (h, w) drops the ones in the padding."""
        if self.autoppn is None:
            raise SlimsegError("this model has no AutoPPN: train one with `slimseg train --stage autoppn`")
        return self.autoppn.propose(embedding, self.img_size, valid_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) 0-255 pixels and zero-pad bottom/right to img_size²."""
        return normalize_and_pad(x, self.pixel_mean, self.pixel_std, self.img_size)

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale (B, C, 4h, 4w) low-res logits to the padded input, crop the padding, resize
        to the original (H, W): returns (B, C, H, W) logits."""
        return upscale_mask_logits(masks, self.img_size, input_size, original_size)


class Sam(PromptableSegmenter):
    """A SAM-family model (ViT image encoder with per-block widths) built from a :class:`SamConfig`."""

    def __init__(self, config: SamConfig, image_encoder: nn.Module | None = None) -> None:
        config.validate()
        encoder = config.image_encoder
        super().__init__(
            image_encoder if image_encoder is not None else ImageEncoderViT(encoder),
            encoder.img_size, encoder.grid_size, config.prompt_encoder, config.mask_decoder,
            config.pixel_mean, config.pixel_std, config.mask_threshold, config.autoppn,
        )
        self.config = config


def normalize_and_pad(
    x: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, img_size: int
) -> torch.Tensor:
    """SAM's preprocessing, shared by every model family: (B, 3, h, w) 0-255 pixels minus the
    (3, 1, 1) mean, over the std, zero-padded bottom/right to (B, 3, img_size, img_size)."""
    x = (x - pixel_mean) / pixel_std
    return F.pad(x, (0, img_size - x.shape[-1], 0, img_size - x.shape[-2]))


def upscale_mask_logits(
    masks: torch.Tensor,
    img_size: int,
    input_size: tuple[int, ...],
    original_size: tuple[int, ...],
) -> torch.Tensor:
    """SAM's postprocessing, shared by every model family: (B, C, h, w) low-res logits →
    bilinear to the padded img_size² input, crop to ``input_size``, bilinear to
    ``original_size``: (B, C, H, W) logits."""
    masks = F.interpolate(masks, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
