"""LiteViT: Lite-SAM's image encoder, a PoolFormer-S12 descendant with multi-scale pooling.

The paper gives the stage widths and the budgets (Table 1) but not the depths, MLP ratios or
neck; those are slimseg's choices, fitted to the budgets and explained in docs/lite-sam.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.errors import SlimsegError
from slimseg.modeling.layers import LayerNorm2d

STRIDES = (4, 8, 16, 32)
EMBEDDING_STRIDE = 16  # SAM's image embedding is 1/16 of the input side


@dataclass(frozen=True)
class LiteViTConfig:
    """A LiteViT image encoder.

    ``dims`` are the four stage widths from the paper; ``depths`` and ``mlp_ratios`` are per
    stage. The neck projects every stage to ``neck_width``, fuses at stride 4 with
    ``neck_depth`` LiteViT blocks and pools to the (out_chans, img_size/16, img_size/16) embedding.
    """

    dims: tuple[int, ...] = (64, 96, 128, 256)
    depths: tuple[int, ...] = (9, 1, 1, 1)
    mlp_ratios: tuple[float, ...] = (4.0, 1.0, 1.0, 1.0)
    pool_sizes: tuple[int, ...] = (3, 5, 7)
    neck_width: int = 96
    neck_depth: int = 1
    neck_mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5
    img_size: int = 640
    in_chans: int = 3
    out_chans: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding (40 at 640 px)."""
        return self.img_size // EMBEDDING_STRIDE

    def validate(self) -> "LiteViTConfig":
        if not (len(self.dims) == len(self.depths) == len(self.mlp_ratios) == len(STRIDES)):
            raise SlimsegError(
                f"LiteViT needs 4 stages: got {len(self.dims)} dims, {len(self.depths)} depths, "
                f"{len(self.mlp_ratios)} mlp_ratios"
            )
        if min(self.dims) <= 0 or min(self.depths) < 0 or min(self.mlp_ratios) <= 0:
            raise SlimsegError("LiteViT dims and mlp_ratios must be positive and depths >= 0")
        if not self.pool_sizes or any(k < 1 or k % 2 == 0 for k in self.pool_sizes):
            raise SlimsegError(f"LiteViT pool_sizes must be odd and positive, got {self.pool_sizes}")
        if self.neck_width <= 0 or self.neck_depth < 0 or self.neck_mlp_ratio <= 0 or self.out_chans <= 0:
            raise SlimsegError("LiteViT neck_width, neck_mlp_ratio and out_chans must be positive")
        if self.img_size <= 0 or self.img_size % STRIDES[-1]:
            raise SlimsegError(f"LiteViT img_size must be a positive multiple of 32, got {self.img_size}")
        return self


def litevit_1x_config() -> LiteViTConfig:
    """LiteViT of Lite-SAM (Table 1: 1.16 M parameters, 10.9 GMACs at 640 px)."""
    return LiteViTConfig()


def litevit_2x_config() -> LiteViTConfig:
    """LiteViT "~2x parameters" (Table 1: 2.19 M, 22.3 GMACs)."""
    return LiteViTConfig(dims=(96, 128, 192, 384))


def litevit_3x_config() -> LiteViTConfig:
    """LiteViT "~3x parameters" (Table 1: 3.63 M, 38.0 GMACs)."""
    return LiteViTConfig(dims=(128, 160, 256, 512))


class MultiScalePooling(nn.Module):
    """MSPM token mixer: ``sum_k w_k * AvgPool_k(x) - x`` with per-channel weights ``w_k``.

    PoolFormer's mixer is the single-scale case (k = 3, w = 1). Several kernel sizes give a
    block receptive fields of 3..7 pixels at once; the learned per-channel weights (initialised
    to an even mix) let each channel choose its scale at the cost of len(pool_sizes) * C
    parameters and no convolution or linear MACs.
    """

    def __init__(self, dim: int, pool_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.pool_sizes = tuple(pool_sizes)
        self.scale_weights = nn.Parameter(torch.full((len(self.pool_sizes), dim, 1, 1), 1.0 / len(self.pool_sizes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        # PyTorch's CPU average pooling is about twice as fast on channels-last memory
        pooled_input = x.contiguous(memory_format=torch.channels_last)
        # count_include_pad=False keeps border pixels an average of real pixels, as PoolFormer
        mixed = sum(
            weight * F.avg_pool2d(pooled_input, k, stride=1, padding=k // 2, count_include_pad=False)
            for weight, k in zip(self.scale_weights, self.pool_sizes)
        )
        return (mixed - pooled_input).contiguous()


class ConvMlp(nn.Module):
    """1x1 conv → GELU → 1x1 conv over (B, C, H, W)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LiteViTBlock(nn.Module):
    """PoolFormer block with the MSPM mixer: x + s1*MSPM(GN(x)), then x + s2*MLP(GN(x)).

    GroupNorm with one group normalises over (C, H, W) as PoolFormer does; the LayerScale
    vectors ``s1``/``s2`` start small so that a deep stack starts close to the identity.
    """

    def __init__(self, dim: int, mlp_ratio: float, pool_sizes: tuple[int, ...], layer_scale_init: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = MultiScalePooling(dim, pool_sizes)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, max(1, round(mlp_ratio * dim)))
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        x = x + self.layer_scale_1 * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2 * self.mlp(self.norm2(x))


class LiteViTNeck(nn.Module):
    """Fuse the four stage outputs into SAM's (B, out_chans, H/16, W/16) embedding.

    Each stage is projected to ``width`` (1x1 conv, at its own resolution), upsampled to
    stride 4 and summed, FPN-style, so that the high-resolution detail and the deep context
    meet before any resolution is lost; ``depth`` LiteViT blocks mix the sum, a 4x4 average
    pool brings it to stride 16 and a 1x1 conv + LayerNorm2d give SAM's embedding (SAM's own
    neck also ends in LayerNorm2d, which the mask decoder expects).
    """

    def __init__(
        self,
        in_dims: tuple[int, ...],
        width: int,
        depth: int,
        mlp_ratio: float,
        pool_sizes: tuple[int, ...],
        layer_scale_init: float,
        out_chans: int,
    ) -> None:
        super().__init__()
        # one norm per stage output, as PoolFormer's dense-prediction variant (fork_feat)
        self.stage_norms = nn.ModuleList(nn.GroupNorm(1, dim) for dim in in_dims)
        self.lateral = nn.ModuleList(nn.Conv2d(dim, width, 1, bias=False) for dim in in_dims)
        self.blocks = nn.Sequential(
            *(LiteViTBlock(width, mlp_ratio, pool_sizes, layer_scale_init) for _ in range(depth))
        )
        self.pool_factor = EMBEDDING_STRIDE // STRIDES[0]
        self.proj = nn.Conv2d(width, out_chans, 1, bias=False)
        self.norm = LayerNorm2d(out_chans)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage outputs at strides 4, 8, 16, 32 → (B, out_chans, H/16, W/16)."""
        size = features[0].shape[-2:]
        fused = 0
        for feature, norm, lateral in zip(features, self.stage_norms, self.lateral):
            # projecting before upsampling is exact (both linear) and 4-64x cheaper
            projected = lateral(norm(feature))
            if projected.shape[-2:] != size:
                projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
            fused = fused + projected
        fused = F.avg_pool2d(self.blocks(fused), self.pool_factor)
        return self.norm(self.proj(fused))


class LiteViT(nn.Module):
    """LiteViT image encoder: (B, 3, S, S) normalised image → (B, out_chans, S/16, S/16)."""

    def __init__(self, config: LiteViTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.img_size = config.img_size
        dims = config.dims
        self.stem = nn.Conv2d(config.in_chans, dims[0], kernel_size=7, stride=4, padding=2)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1) for i in range(len(dims) - 1)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(LiteViTBlock(dim, ratio, config.pool_sizes, config.layer_scale_init) for _ in range(depth))
            )
            for dim, depth, ratio in zip(dims, config.depths, config.mlp_ratios)
        )
        self.neck = LiteViTNeck(
            in_dims=dims,
            width=config.neck_width,
            depth=config.neck_depth,
            mlp_ratio=config.neck_mlp_ratio,
            pool_sizes=config.pool_sizes,
            layer_scale_init=config.layer_scale_init,
            out_chans=config.out_chans,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → the four stage outputs, (B, dims[i], H/s, W/s) for s = 4, 8, 16, 32."""
        features = []
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            if index:
                x = self.downsamples[index - 1](x)
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) with H, W multiples of 32 → (B, out_chans, H/16, W/16)."""
        if x.ndim != 4 or x.shape[-1] % STRIDES[-1] or x.shape[-2] % STRIDES[-1]:
            raise SlimsegError(f"LiteViT expects (B, 3, H, W) with H and W multiples of 32, got {tuple(x.shape)}")
        return self.neck(self.forward_features(x))
