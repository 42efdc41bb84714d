"""Mask decoder: image embedding + prompt embeddings → mask logits and IoU predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.modeling.layers import MLP, LayerNorm2d
from slimseg.modeling.sam.config import MaskDecoderConfig
from slimseg.modeling.sam.fast_paths import fast_paths_enabled
from slimseg.modeling.sam.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.transformer_dim
        self.transformer_dim = dim
        self.transformer = TwoWayTransformer(
            depth=config.transformer_depth,
            embedding_dim=dim,
            num_heads=config.transformer_num_heads,
            mlp_dim=config.transformer_mlp_dim,
            attention_downsample_rate=config.attention_downsample_rate,
        )
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts.

        Arguments:
            image_embeddings: (1, C, h, w) shared by all prompts, or (B, C, h, w) one per prompt.
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, C); dense_prompt_embeddings: (B, C, h, w).
            multimask_output: three candidate masks per prompt instead of one.
        Returns:
            (B, 3|1, 4h, 4w) mask logits and (B, 3|1) predicted IoU.
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, selected
        )
        return masks, iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks of the ``mask_tokens`` (all ``num_mask_tokens`` by default) and all IoU
        predictions, before multimask selection.

        A dense embedding of batch 1, or expanded from one (no mask prompt), is shared by all
        prompts: with a single image embedding the image side then starts shared too.
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)

        if dense_prompt_embeddings.stride(0) == 0 and fast_paths_enabled():
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = image_embeddings + dense_prompt_embeddings
        if not fast_paths_enabled():
            src = src.expand(batch, -1, -1, -1)
        _, _, height, width = src.shape
        hs, image_tokens = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        hypernetworks = list(enumerate(self.output_hypernetworks_mlps))[mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in hypernetworks], dim=1)
        masks = self._masks(image_tokens, hyper_in, height, width)
        return masks, self.iou_prediction_head(iou_token_out)

    def _masks(self, image_tokens: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``output_upscaling`` then the hypernetwork product, computed on image tokens.

        A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 block,
        so it is one matrix product per token; the two of them give each token a 4x4 block,
        which is only put in image order once, for the final (B, T, 4h, 4w) logits.

        Arguments:
            image_tokens: (B, h*w, C). hyper_in: (B, T, C / 8).
        """
        if not fast_paths_enabled():
            batch, _, channels = image_tokens.shape
            upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, channels, height, width))
            return (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
        conv1, norm, _, conv2, _ = self.output_upscaling
        # (2*2*out, in) weights, rows ordered (ky, kx, out); each bias repeated per (ky, kx)
        weight1 = conv1.weight.permute(2, 3, 1, 0).flatten(0, 2)
        x = F.linear(image_tokens, weight1, conv1.bias.repeat(4)).unflatten(-1, (4, -1))  # (B, hw, 4, C/4)
        x = F.gelu(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        weight2 = conv2.weight.permute(2, 3, 1, 0).flatten(0, 2)
        x = F.gelu(F.linear(x, weight2, conv2.bias.repeat(4)).unflatten(-1, (4, -1)))  # (B, hw, 4, 4, C/8)
        masks = x.flatten(1, 3) @ hyper_in.transpose(1, 2)  # (B, hw*16, T)
        # token (i, j), first block (ky1, kx1), second (ky2, kx2) → pixel (4i+2ky1+ky2, 4j+2kx1+kx2);
        # the batch axis stays -1 so that traced graphs keep it dynamic
        masks = masks.view(-1, height, width, 2, 2, 2, 2, hyper_in.shape[1]).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.flatten(2, 4).flatten(3, 5)
