"""Global bottleneck pruning: q/k/v offsets and MLP channels ranked across all blocks.

Split from ``compress/prune.py``: tp 1.6.1's own global ranking can empty a block, so the
budget is computed and spent here, every block keeping its floor.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from slimseg.compress.ratio_limits import global_scope_target

__all__ = ["global_bottleneck_groups"]


def global_bottleneck_groups(pruner: tp.pruner.BasePruner, blocks: list[nn.Module], ratio: float,
                              round_to: int) -> list[tp.Group]:
    """The bottleneck groups to prune, ranked across blocks here rather than by tp.

    tp 1.6.1's global threshold can select every channel of a block; its guard then skips
    that group, so the block stayed whole and high ratios overshot their budget. Here each
    block keeps its floor and the rest of the budget goes to the globally best channels.
    """
    # The same roots as tp's: attention by proj's inputs, the MLP by lin1's outputs.
    attention = [_full_group(pruner, block.attn.proj, out=False) for block in blocks]
    mlp = [_full_group(pruner, block.mlp.lin1, out=True) for block in blocks]
    heads = [block.attn.num_heads for block in blocks]
    # All heads lose the same offsets, so an offset scores the mean over heads (tp's channel groups).
    offset_scores = [pruner.estimate_importance(g).view(h, -1).mean(0) for g, h in zip(attention, heads)]
    offsets = _least_important(offset_scores, 1, ratio, "q/k/v offset per head")
    channels = _least_important([pruner.estimate_importance(g) for g in mlp], round_to, ratio, "MLP channels")
    chosen = []
    for group, count, scores, removed in zip(attention, heads, offset_scores, offsets):
        chosen.append((group, [o + h * len(scores) for h in range(count) for o in removed]))
    chosen += list(zip(mlp, channels))
    return [pruner.DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, sorted(idxs))
            for group, idxs in chosen if idxs]


def _full_group(pruner: tp.pruner.BasePruner, layer: nn.Module, out: bool) -> tp.Group:
    """tp's group of every output (or input) channel of ``layer``."""
    handlers = pruner.DG.get_pruner_of_module(layer)
    handler = handlers.prune_out_channels if out else handlers.prune_in_channels
    width = (pruner.DG.get_out_channels if out else pruner.DG.get_in_channels)(layer)
    return pruner.DG.get_pruning_group(layer, handler, list(range(width)))


def _least_important(scores: list[torch.Tensor], unit: int, ratio: float, what: str) -> list[list[int]]:
    """Per block, the indices to remove so that the scope keeps its global target.

    A block removes a prefix of its ascending scores: ``width % unit`` of them (kept widths
    are multiples of ``unit``), then whole chunks of ``unit``, never its last chunk. Chunks
    are ranked across blocks by mean score; they ascend within a block, so the lowest ones
    form prefixes.
    """
    widths = [len(s) for s in scores]
    target = global_scope_target(widths, unit, ratio, what)
    scores = [s.detach().float().cpu() for s in scores]
    orders = [torch.argsort(s, stable=True) for s in scores]
    forced = [w % unit for w in widths]
    chunks = sorted((float(s[order[f + j * unit:f + (j + 1) * unit]].mean()), b, j)
                    for b, (s, order, f) in enumerate(zip(scores, orders, forced))
                    for j in range(len(s) // unit - 1))
    counts = [0] * len(scores)
    for _, b, _ in chunks[:max(sum(w // unit for w in widths) - target, 0)]:
        counts[b] += 1
    return [order[:f + n * unit].tolist() for order, f, n in zip(orders, forced, counts)]
