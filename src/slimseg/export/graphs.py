"""The modules that become ONNX graphs. They only arrange inputs and outputs around the
model's own parts (image encoder, prompt encoder, mask decoder, AutoPPN, SAM's pre- and
post-processing); no model math is repeated here.

Graph contracts (shapes; B = batch or prompts, N = points per prompt, S = model.img_size,
h x w = the embedding grid, S/16 for every current family):

- ``image_encoder``: ``image`` float32 (B, 3, S, S) normalised and padded (``model.preprocess``)
  → ``image_embeddings`` float32 (B, C, h, w). With ``uint8_input`` the input is the resized
  but unnormalised, unpadded (B, 3, H', W') uint8 image (max(H', W') == S) and the graph does
  the normalisation and padding.
- ``decoder``: ``image_embeddings`` (1, C, h, w), ``point_coords`` (B, N, 2) float32 XY in the
  resized frame, ``point_labels`` (B, N) float32 (1 fg, 0 bg, 2/3 box corners, -1 padding),
  ``mask_input`` (1 or B, 1, 4h, 4w), ``has_mask_input`` (1,), ``orig_im_size`` (2,) float32
  (H, W) → ``masks`` (B, 4, H, W) logits at the original size, ``iou_predictions`` (B, 4),
  ``low_res_masks`` (B, 4, 4h, 4w). Output 0 is SAM's single-mask answer, 1..3 the multimask ones.
- ``autoppn``: ``image_embeddings`` (B, C, h, w) → ``heatmap_logits`` (B, G, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimseg.modeling.sam.prompt_encoder import LABEL_PADDING
from slimseg.modeling.sam.sam import PromptableSegmenter, normalize_and_pad, upscale_mask_logits

# SAM's ONNX label codes for the two corners of a box (the prompt encoder's
# point_embeddings[2] and [3]).
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3


class EncoderGraph(nn.Module):
    """Image → image embedding, optionally with SAM's preprocessing inside the graph."""

    def __init__(self, model: PromptableSegmenter, uint8_input: bool = False) -> None:
        super().__init__()
        self.model = model
        self.uint8_input = uint8_input

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            image = normalize_and_pad(image.float(), self.model.pixel_mean, self.model.pixel_std, self.model.img_size)
        return self.model.image_encoder(image)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder + mask upscaling, with segment-anything's ONNX inputs."""

    def __init__(self, model: PromptableSegmenter) -> None:
        super().__init__()
        self.model = model

    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        # The encoder's own point embedding handles -1/0/1; box corners arrive as points
        # labelled 2/3 and get the corner codes that ``_embed_boxes`` adds. No padding token is
        # appended: the caller pads, as with segment-anything's ONNX model.
        sparse = encoder._embed_points(coords, labels, pad=False)
        labels = labels[..., None]
        sparse = sparse + (labels == LABEL_BOX_TOP_LEFT) * encoder.point_embeddings[2].weight
        return sparse + (labels == LABEL_BOX_BOTTOM_RIGHT) * encoder.point_embeddings[3].weight

    def _dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        # Multiplying by exactly 0 or 1 gives the torch path's embedding bit for bit, without
        # control flow in the graph.
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        # (mask_batch, C, h, w), left to broadcast against the prompts: one mask for all
        # prompts or one per prompt, with no copy per prompt in either case
        return has_mask_input * encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self._sparse(point_coords, point_labels)
        dense = self._dense(mask_input, has_mask_input)
        low_res, iou = self.model.mask_decoder.predict_masks(
            image_embeddings, self.model.prompt_encoder.get_dense_pe(), sparse, dense
        )
        # The resized size as ResizeLongestSide computes it, in float64 so that the rounding
        # agrees with Python's.
        original = orig_im_size.to(torch.float64)
        resized = torch.floor(original * (self.model.img_size / original.max()) + 0.5).to(torch.int64)
        original = original.to(torch.int64)
        masks = upscale_mask_logits(low_res, self.model.img_size, (resized[0], resized[1]), (original[0], original[1]))
        return masks, iou, low_res


class AutoPPNGraph(nn.Module):
    """Image embedding → AutoPPN heatmap logits; peak picking stays outside the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.autoppn = model.autoppn

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.autoppn(image_embeddings)


@dataclass(frozen=True)
class GraphSpec:
    """One graph to export: its module, example inputs, names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, list[int | str]]  # name → shape, named axes dynamic (all float32)
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs(model: PromptableSegmenter, uint8_input: bool = False) -> list[GraphSpec]:
    """The graphs of ``model``: image_encoder and decoder always, autoppn when it has one."""
    size = model.img_size
    embed_dim = model.prompt_encoder.embed_dim
    grid_h, grid_w = model.prompt_encoder.image_embedding_size
    mask_h, mask_w = model.prompt_encoder.mask_input_size
    # Batch 2 and 3 prompts x 4 points: sizes that differ from one another and from 1, so the
    # tracer cannot confuse a dynamic axis with a constant.
    if uint8_input:
        image = torch.randint(0, 256, (2, 3, size, size * 3 // 4), dtype=torch.uint8)
        image_axes = {0: "batch", 2: "height", 3: "width"}
    else:
        image = torch.randn(2, 3, size, size)
        image_axes = {0: "batch"}
    embedding = torch.randn(1, embed_dim, grid_h, grid_w)
    tokens = model.mask_decoder.num_mask_tokens
    specs = [
        GraphSpec("image_encoder", EncoderGraph(model, uint8_input), {"image": image},
                  {"image_embeddings": ["batch", embed_dim, grid_h, grid_w]},
                  {"image": image_axes, "image_embeddings": {0: "batch"}}),
        GraphSpec(
            "decoder", DecoderGraph(model),
            {
                "image_embeddings": embedding,
                "point_coords": torch.rand(3, 4, 2) * size,
                "point_labels": torch.tensor([[1.0, 0.0, 2.0, 3.0], [1.0, 1.0, float(LABEL_PADDING), -1.0],
                                              [2.0, 3.0, 1.0, -1.0]]),
                "mask_input": torch.randn(1, 1, mask_h, mask_w),
                "has_mask_input": torch.ones(1),
                "orig_im_size": torch.tensor([float(size) * 0.75, float(size)]),
            },
            {"masks": ["prompts", tokens, "height", "width"], "iou_predictions": ["prompts", tokens],
             "low_res_masks": ["prompts", tokens, mask_h, mask_w]},
            {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
             "mask_input": {0: "mask_batch"}, "masks": {0: "prompts", 2: "height", 3: "width"},
             "iou_predictions": {0: "prompts"}, "low_res_masks": {0: "prompts"}},
        ),
    ]
    if getattr(model, "autoppn", None) is not None:
        specs.append(GraphSpec("autoppn", AutoPPNGraph(model), {"image_embeddings": torch.randn(2, embed_dim, grid_h, grid_w)},
                               {"heatmap_logits": ["batch", model.autoppn.config.num_groups, grid_h, grid_w]}, {"image_embeddings": {0: "batch"}, "heatmap_logits": {0: "batch"}}))
    return specs
