"""Attention with MViTv2's decomposed relative positions, as SAM's image encoder uses it.

The relative-position term of query i and key j is ``rel_h[i, row(j)] + rel_w[i, col(j)]``:
two small (queries, H) and (queries, W) tables whose outer sum is an additive attention bias.
Materialised whole, that bias is (B, heads, H*W, H*W): 805 MB for one global block of SAM-B,
allocated fresh (and page-faulted in) on every call. CPU inference therefore runs the native
kernel (native_attention.py), which forms the bias from its two factors as it goes, where it
is built (for windowed blocks, straight on the unpadded token grid:
:func:`windowed_cpu_rel_pos_attention`). It computes in float32: bfloat16 and float16 inputs
(``--dtype`` on a CPU) are widened for it and its result narrowed back, which costs two
copies of q, k and v but is faster than torch's low-precision attention on a CPU and more
exact (the kernel's softmax is float32's). Otherwise it builds the bias a few query rows
at a time into one reused buffer and runs torch's fused attention per chunk. Compiled graphs reach the
same CPU path through the custom op ``slimseg::rel_pos_attention``, opaque to the compiler.
Training, tracing for export and CUDA take the whole-bias path, which autograd and the exporters understand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimseg.modeling.sam.fast_paths import chunked_cpu_inference, cpu_inference, is_compiling
from slimseg.modeling.sam.native_attention import KERNEL_DTYPE, KERNEL_INPUT_DTYPES, native_kernel

# Bias bytes per chunk. Whole windows are grouped up to WINDOW_CHUNK_BYTES, small enough for
# the allocator to reuse the buffer instead of page-faulting a fresh one on every call. A
# global block's rows take more: fused attention over few query rows loses more than the
# buffer costs (measured on a 2-core CPU, SlimSAM-77 and SAM-B global blocks).
WINDOW_CHUNK_BYTES = 8 * 2**20
ROW_CHUNK_BYTES = 64 * 2**20


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) relative-position embeddings from an (L, C) table.

    The table is linearly resized when its length is not ``2 * max(q_size, k_size) - 1``
    (a checkpoint trained at another resolution).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(rel_pos.t()[None], size=max_rel_dist, mode="linear")[0].t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    relative = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[relative.long()]


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the bias.

    Arguments:
        q: (B, heads, H*W, C) unscaled queries.
        size: the (H, W) token grid, the same for queries and keys.
    Returns:
        rel_h (B, heads, H*W, H) and rel_w (B, heads, H*W, W): the bias of query i and key
        (r, c) is ``rel_h[..., i, r] + rel_w[..., i, c]``.
    """
    height, width = size
    batch, heads, _, channels = q.shape
    table_h = relative_position_table(height, height, rel_pos_h.to(q.dtype))
    table_w = relative_position_table(width, width, rel_pos_w.to(q.dtype))
    grid_q = q.reshape(batch, heads, height, width, channels)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h).reshape(batch, heads, height * width, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w).reshape(batch, heads, height * width, width)
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The whole (B, heads, H*W, H*W) additive bias, for ``q`` as in :func:`rel_pos_terms`."""
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    batch, heads, queries, _ = rel_h.shape
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, queries, size[0] * size[1])


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """softmax(scale·q·kᵀ + bias)·v for (B, heads, H*W, C) q, k and (B, heads, H*W, Cv) v.

    Returns (B, heads, H*W, Cv). Every path computes the same bias and the same attention;
    they differ only in how much of the bias exists at one time.
    """
    if cpu_inference(q):
        if not is_compiling():
            return cpu_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, size, scale)
        return _CPU_OP(q, k, v, rel_pos_h, rel_pos_w, size[0], size[1], scale)
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def cpu_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                          rel_pos_w: torch.Tensor, size: tuple[int, int], scale: float) -> torch.Tensor:
    """:func:`rel_pos_attention` for CPU inference, without the whole bias: the native kernel,
    else chunks of the bias. Returns a view of (B, H*W, heads, Cv) storage, so that the
    caller's transpose(1, 2).reshape(B, H*W, -1) is a view rather than a copy."""
    kernel = native_kernel() if q.dtype in KERNEL_INPUT_DTYPES else None
    if kernel is not None:
        dtype = q.dtype
        q, k, v = (_kernel_input(t) for t in (q, k, v))
        out = kernel(q, k, v, *_gathered_tables(rel_pos_h, rel_pos_w, size, KERNEL_DTYPE), scale)
        return out.to(dtype)  # strides preserved: still a view of (B, H*W, heads, Cv) storage
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    batch, heads, queries, _ = q.shape
    height, width = size
    value_width = v.shape[-1]
    q, k, v = _pad_head_width(q), _pad_head_width(k), _pad_head_width(v)
    item_bytes = heads * queries * height * width * q.element_size()
    # Whole items (windows) per chunk when one fits the budget, else query rows of one item.
    items = max(1, min(batch, WINDOW_CHUNK_BYTES // item_bytes))
    rows = queries if item_bytes <= WINDOW_CHUNK_BYTES else max(1, min(queries, ROW_CHUNK_BYTES * queries // item_bytes))
    bias = q.new_empty(items, heads, rows, height, width)
    out = _cpu_output(q, value_width)
    for first in range(0, batch, items):
        last = min(first + items, batch)
        for start in range(0, queries, rows):
            stop = min(start + rows, queries)
            chunk = bias[: last - first, :, : stop - start]
            torch.add(rel_h[first:last, :, start:stop, :, None], rel_w[first:last, :, start:stop, None, :], out=chunk)
            mask = chunk.view(last - first, heads, stop - start, height * width)
            out[first:last, :, start:stop] = F.scaled_dot_product_attention(
                q[first:last, :, start:stop], k[first:last], v[first:last], attn_mask=mask, scale=scale
            )[..., :value_width]
    return out


def windowed_cpu_rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor,
    rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, window: int, scale: float,
) -> torch.Tensor:
    """Relative-position attention within the window x window windows of a token grid, as
    SAM's window partition (zero padding on the bottom and right) and :func:`rel_pos_attention`
    per window compute it, by the native kernel straight on the unpadded grid.

    Arguments:
        q, k: (B, H, W, heads, C) CPU projections of the grid's tokens, in one of
            KERNEL_INPUT_DTYPES.
        v: (B, H, W, heads, Cv), the same.
        k_pad, v_pad: (heads, C) and (heads, Cv): the projections of a zero padding token.
    Returns:
        (B, H, W, heads, Cv) in q's dtype. Raises RuntimeError where the native kernel cannot
        run (:func:`windowed_kernel_applies` says beforehand).
    """
    kernel = native_kernel()
    if kernel is None:
        raise RuntimeError("windowed attention on the grid needs the native kernel")
    tables = _gathered_tables(rel_pos_h, rel_pos_w, (window, window), KERNEL_DTYPE)
    dtype = q.dtype
    q, k, v = (_kernel_input(t) for t in (q, k, v))
    return kernel.windows(q, k, v, *tables, scale, k_pad, v_pad).to(dtype)


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 with unit-stride channels, which the kernel reads (a compiled graph
    may hand it other strides; a widened copy keeps the layout)."""
    t = t.to(KERNEL_DTYPE)
    return t if t.stride(-1) == 1 else t.contiguous()


def _gathered_tables(rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int],
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (H, H, C) and (W, W, C) tables the native kernel takes."""
    return (relative_position_table(size[0], size[0], rel_pos_h.to(dtype)),
            relative_position_table(size[1], size[1], rel_pos_w.to(dtype)))


def windowed_kernel_applies(x: torch.Tensor) -> bool:
    """Whether :func:`windowed_cpu_rel_pos_attention` can run on the projections of ``x``:
    eager CPU inference in one of KERNEL_INPUT_DTYPES (under autocast or not) with the
    native kernel built."""
    return x.dtype in KERNEL_INPUT_DTYPES and chunked_cpu_inference(x) and native_kernel() is not None


def _cpu_output(q: torch.Tensor, value_width: int) -> torch.Tensor:
    """An empty (B, heads, H*W, Cv) result in (B, H*W, heads, Cv) storage, as fused attention
    and the native kernel return it."""
    batch, heads, queries, _ = q.shape
    return q.new_empty(batch, queries, heads, value_width).transpose(1, 2)


def _register_cpu_op() -> Callable[..., torch.Tensor]:
    """``slimseg::rel_pos_attention``: :func:`cpu_rel_pos_attention` as one operator that
    torch.compile keeps in its graphs as it is, instead of tracing the kernel call (which it
    cannot) or the chunk loop."""
    @torch.library.custom_op("slimseg::rel_pos_attention", mutates_args=())
    def operator(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                 rel_pos_w: torch.Tensor, height: int, width: int, scale: float) -> torch.Tensor:
        return cpu_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, (height, width), scale)

    @operator.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
          height: int, width: int, scale: float) -> torch.Tensor:
        return _cpu_output(q, v.shape[-1])

    return operator


def _pad_head_width(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the channels per head to a multiple of 8. Zeros change neither q·k nor the
    kept value channels, and the CPU attention kernel's products run on whole vector
    registers: SlimSAM-77's 14 channels padded to 16 made its global blocks 16 % faster."""
    missing = -x.shape[-1] % 8
    return F.pad(x, (0, missing)) if missing else x


_CPU_OP = _register_cpu_op()
