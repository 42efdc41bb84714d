"""Two-way transformer of SAM's mask decoder: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimseg.modeling.layers import MLPBlock
from slimseg.modeling.sam.fast_paths import fast_paths_enabled


class DecoderAttention(nn.Module):
    """Multi-head attention whose internal width may be downsampled (256 → 128 for cross-attention).

    Between a handful of prompt tokens and thousands of image tokens, projecting every image
    token costs far more than the attention itself. :meth:`attend_image` and
    :meth:`attend_tokens` therefore move the image-side projections onto the few token-side
    vectors when that is cheaper (``heads * tokens < internal width``): q·(W x) = (Wᵀq)·x, and
    a softmax-weighted sum of projected values is the projection of the weighted sum. The
    results are those of :meth:`forward` up to float rounding.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal_dim = embedding_dim // downsample_rate
        if internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {internal_dim}")
        self.num_heads = num_heads
        self.internal_dim = internal_dim
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    @property
    def scale(self) -> float:
        return (self.internal_dim // self.num_heads) ** -0.5

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, internal) → (B, heads, N, internal / heads)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) → (B, N, heads * d)."""
        return x.transpose(1, 2).flatten(2)

    def _per_head(self, linear: nn.Linear) -> torch.Tensor:
        """An input projection's (internal, C) weight as (heads, d, C)."""
        return linear.weight.unflatten(0, (self.num_heads, -1))

    def _folding_pays(self, tokens: int) -> bool:
        return fast_paths_enabled() and self.num_heads * tokens < self.internal_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, Nq, C), (B|1, Nk, C), (B|1, Nk, C) → (B, Nq, C)."""
        qh, kh, vh = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        if kh.shape[0] != qh.shape[0]:
            # keys shared by every query batch: broadcast them instead of copying
            probs = torch.softmax((qh @ kh.transpose(-1, -2)) * self.scale, dim=-1)
            out = probs @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        return self.out_proj(self._merge(out))

    def attend_image(self, queries: torch.Tensor, image_k: torch.Tensor, image_v: torch.Tensor) -> torch.Tensor:
        """Prompt tokens attend to image tokens.

        Arguments:
            queries: (B, Nq, C) prompt tokens. image_k, image_v: (B|1, HW, C) image tokens
            (with and without positional encoding); batch 1 is shared by all B prompts.
        Returns:
            (B, Nq, C).
        """
        if image_k.shape[0] != queries.shape[0] or not self._folding_pays(queries.shape[1]):
            return self.forward(queries, image_k, image_v)
        qh = self._heads(self.q_proj(queries))  # (B, h, Nq, d)
        # q·(W_k x + b_k): the q·b_k term is the same for every key, so the softmax drops it.
        q_in_image_space = torch.einsum("bhnd,hdc->bhnc", qh, self._per_head(self.k_proj)).flatten(1, 2)
        probs = torch.softmax((q_in_image_space @ image_k.transpose(1, 2)) * self.scale, dim=-1)
        mixed = (probs @ image_v).unflatten(1, (self.num_heads, -1))  # (B, h, Nq, C)
        # each row of probs sums to 1, so the value bias passes through unchanged
        values = torch.einsum("bhnc,hdc->bhnd", mixed, self._per_head(self.v_proj))
        values = values + self.v_proj.bias.unflatten(0, (self.num_heads, -1))[:, None, :]
        return self.out_proj(self._merge(values))

    def attend_tokens(self, image_q: torch.Tensor, tokens_k: torch.Tensor, tokens_v: torch.Tensor) -> torch.Tensor:
        """Image tokens attend to prompt tokens.

        Arguments:
            image_q: (B|1, HW, C) image tokens with positional encoding; batch 1 is shared.
            tokens_k, tokens_v: (B, Nt, C) prompt tokens (with and without positional encoding).
        Returns:
            (B, HW, C).
        """
        if not self._folding_pays(tokens_k.shape[1]):
            return self.forward(image_q, tokens_k, tokens_v)
        kh = self._heads(self.k_proj(tokens_k))  # (B, h, Nt, d)
        vh = self._heads(self.v_proj(tokens_v))
        # (W_q x + b_q)·k = (W_qᵀk)·x + b_q·k
        k_in_image_space = torch.einsum("bhnd,hdc->bhnc", kh, self._per_head(self.q_proj)).flatten(1, 2)
        k_bias = torch.einsum("bhnd,hd->bhn", kh, self.q_proj.bias.unflatten(0, (self.num_heads, -1))).flatten(1)
        # Logits as (B, h * Nt, HW): the softmax over each head's few tokens then runs along
        # a strided axis with the long HW axis innermost, which vectorises.
        logits = (k_in_image_space @ image_q.transpose(1, 2) + k_bias[:, :, None]) * self.scale
        probs = torch.softmax(logits.unflatten(1, (self.num_heads, -1)), dim=2).flatten(1, 2)
        # out_proj(Σ_h p_h v_h) = Σ_h p_h (v_h W_o,hᵀ + b_o / h): each head's p_h sums to 1
        out_weight = self.out_proj.weight.unflatten(1, (self.num_heads, -1))  # (C, h, d)
        values = torch.einsum("bhnd,chd->bhnc", vh, out_weight) + self.out_proj.bias / self.num_heads
        return probs.transpose(1, 2) @ values.flatten(1, 2)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image attention, token MLP, image→token attention."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int,
                 skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.mlp.act = nn.ReLU()
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        keys_with_pe = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image.attend_image(queries + query_pe, keys_with_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(keys + self.cross_attn_image_to_token.attend_tokens(keys_with_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
            image_embedding: (B|1, C, h, w), batch 1 when every prompt shares it (the first
            layer's image-side work is then done once); image_pe: its (1, C, h, w)
            positional encoding. point_embedding: (B, N, C) prompt and output tokens.
        Returns:
            (B, N, C) processed tokens and (B, h*w, C) processed image tokens.
        """
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image.attend_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys
