"""ViT image encoder of SAM with split q/k/v projections and per-block widths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.modeling.layers import LayerNorm2d, MLPBlock
from slimseg.modeling.sam.config import BlockConfig, ImageEncoderConfig
from slimseg.modeling.sam.fast_paths import chunked_cpu_inference
from slimseg.modeling.sam.rel_pos import rel_pos_attention, windowed_cpu_rel_pos_attention, windowed_kernel_applies


# Hidden-activation bytes per MLP chunk (see Block._mlp_residual).
MLP_CHUNK_BYTES = 16 * 2**20


class PatchEmbed(nn.Module):
    """(B, 3, H, W) image → (B, H/p, W/p, C) tokens with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous once here: a permuted view would pass its layout on through every
        # residual sum, and each layer norm and projection would copy it again.
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid with separate q, k, v."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, v_dim, bias=qkv_bias)
        self.proj = nn.Linear(v_dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is set")
            head_dim = qk_dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    @property
    def scale(self) -> float:
        """Logit scale, derived from the current q width so that pruning keeps it right."""
        return (self.q.out_features // self.num_heads) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = x.reshape(batch, height * width, -1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, height * width, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(tokens)), heads(self.k(tokens)), heads(self.v(tokens))
        if self.use_rel_pos:
            out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (height, width), self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)

    def within_windows(self, x: torch.Tensor, window_size: int) -> torch.Tensor | None:
        """What window_partition, this module and window_unpartition compute for the (B, H, W, C)
        grid ``x``, without their copies and without projecting or attending for the padding
        tokens: the native kernel reads each window off the grid. None where that kernel
        cannot run, or where forward hooks on this module or its projections expect SAM's
        window layout (distillation's feature hooks): then the caller partitions."""
        if not (self.use_rel_pos and windowed_kernel_applies(x)) or _hooked(self):
            return None
        batch, height, width, _ = x.shape
        q, k, v = (linear(x).view(batch, height, width, self.num_heads, -1) for linear in (self.q, self.k, self.v))
        # SAM pads the normalised tokens with zeros: a padding token's key and value are the biases
        k_pad, v_pad = (
            linear.bias.view(self.num_heads, -1) if linear.bias is not None else x.new_zeros(self.num_heads, channels)
            for linear, channels in ((self.k, q.shape[-1]), (self.v, v.shape[-1]))
        )
        out = windowed_cpu_rel_pos_attention(q, k, v, k_pad, v_pad, self.rel_pos_h, self.rel_pos_w, window_size,
                                             self.scale)
        return self.proj(out.view(batch, height, width, -1))


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) → (B * windows, ws, ws, C), zero-padding H and W up to multiples of ws."""
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded = (height + pad_h, width + pad_w)
    x = x.view(batch, padded[0] // window_size, window_size, padded[1] // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, padded


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: back to (B, H, W, C) without the padding."""
    rows, cols = padded[0] // window_size, padded[1] // window_size
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded[0], padded[1], -1)
    return x[:, : size[0], : size[1], :]


class Block(nn.Module):
    """Pre-norm transformer block with windowed or global attention."""

    def __init__(self, dim: int, config: BlockConfig, grid_size: int, qkv_bias: bool, use_rel_pos: bool,
                 norm_eps: float) -> None:
        super().__init__()
        self.window_size = config.window_size
        attention_size = grid_size if config.is_global else config.window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads=config.num_heads,
            qk_dim=config.qk_dim,
            v_dim=config.v_dim,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=(attention_size, attention_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            attended = self.attn.within_windows(x, self.window_size)
            if attended is None:
                size = (x.shape[1], x.shape[2])
                windows, padded = window_partition(x, self.window_size)
                attended = window_unpartition(self.attn(windows), self.window_size, padded, size)
            x = attended
        else:
            x = self.attn(x)
        x = shortcut + x
        return self._mlp_residual(x)

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm2(x)), a few thousand tokens at a time in CPU inference when the hidden
        activation would be large (SAM-B: 50 MB), so that its memory is reused from chunk to
        chunk instead of being faulted in afresh; the tokens are independent, so the result
        is the same."""
        hidden_bytes = self.mlp.lin1.out_features * x.element_size()
        tokens = x.numel() // x.shape[-1]
        rows = MLP_CHUNK_BYTES // hidden_bytes
        if rows >= tokens or not chunked_cpu_inference(x):
            return x + self.mlp(self.norm2(x))
        flat = x.reshape(tokens, x.shape[-1])
        out = torch.empty_like(flat)
        for start in range(0, tokens, rows):
            part = flat[start : start + rows]
            torch.add(part, self.mlp(self.norm2(part)), out=out[start : start + rows])
        return out.view_as(x)


class ImageEncoderViT(nn.Module):
    """(B, 3, S, S) normalised, padded images → (B, out_chans, S/p, S/p) image embeddings."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        grid = config.grid_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if config.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, block, grid, config.qkv_bias, config.use_rel_pos, config.norm_eps)
            for block in config.blocks
        )
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
