"""The highest pruning ratio a SAM image encoder can reach, and the check that says it.

torch-pruning silently skips a group that a ratio would empty, so ratios beyond these limits
are refused before tracing, with the highest one that works (a ``UsageError``: the ratio is
the caller's choice). Kept widths are floored as tp floors them, so the limits are exact.
"""

from __future__ import annotations

import math

from slimseg.errors import UsageError
from slimseg.modeling.sam.image_encoder import ImageEncoderViT

__all__ = ["RatioOutOfReach", "check_ratio_reachable", "global_highest", "global_scope_target", "highest_ratio"]


class RatioOutOfReach(UsageError):
    """A pruning ratio that leaves some sub-structure too few channels; ``highest`` is the
    highest reachable ratio (4 decimals, rounded down)."""

    def __init__(self, reason: str, highest: float) -> None:
        self.reason, self.highest = reason, highest
        super().__init__(f"{reason}, so the highest reachable ratio is {highest}")


def _local_widths(encoder: ImageEncoderViT, stage: str, round_to: int) -> list[tuple[str, int, int]]:
    """(name, width, channels that must stay) of every group that local pruning shrinks."""
    if stage == "embedding":
        return [("embedding width", encoder.patch_embed.proj.out_channels, round_to)]
    widths = []
    for block in encoder.blocks:
        widths.append(("q/k/v head dim", block.attn.q.out_features // block.attn.num_heads, 1))
        widths.append(("MLP hidden width", block.mlp.lin1.out_features, 1))
    return widths


def _local_highest(width: int, unit: int) -> float:
    """The largest 4-decimal ratio that keeps ``unit`` of ``width`` channels under the floor
    that the check and tp apply: 1 - unit / width rounded down, then lowered while float
    rounding still makes it fall short (10 * (1 - 0.9) floors to 0)."""
    highest = math.floor((1 - unit / width) * 1e4) / 1e4
    while highest > 0 and int(width * (1 - highest)) < unit:
        highest = round(highest - 1e-4, 4)
    return max(highest, 0.0)


def global_target(widths: list[int], unit: int, ratio: float) -> int:
    """Chunks of ``unit`` channels a global scope keeps: its budget rounded down once."""
    # The epsilon stops e.g. 10 * (1 - 0.9) = 0.9999999999999998 from flooring to 0.
    return math.floor(sum(widths) * (1 - ratio) + 1e-9) // unit


def global_scope_target(widths: list[int], unit: int, ratio: float, what: str) -> int:
    """``global_target``, or ``RatioOutOfReach`` when it leaves a block fewer than ``unit``
    channels of ``what`` (the shared budget cannot pay every block's floor)."""
    target = global_target(widths, unit, ratio)
    if target < len(widths):
        raise RatioOutOfReach(f"global pruning cannot reach ratio {ratio}: every block keeps at least {unit} {what}",
                              global_highest(widths, unit))
    return target


def global_highest(widths: list[int], unit: int) -> float:
    """The highest ratio at which every block of a global scope keeps ``unit`` channels."""
    return max(math.floor((1 - len(widths) * unit / sum(widths)) * 1e4) / 1e4, 0.0)


def _global_scopes(encoder: ImageEncoderViT, round_to: int) -> list[tuple[list[int], int, str]]:
    blocks = list(encoder.blocks)
    return [([b.attn.q.out_features // b.attn.num_heads for b in blocks], 1, "q/k/v offset per head"),
            ([b.mlp.lin1.out_features for b in blocks], round_to, "MLP channels")]


def highest_ratio(encoder: ImageEncoderViT, stage: str, mode: str, round_to: int) -> float:
    """The highest ratio that pruning ``stage`` of ``encoder`` in ``mode`` can reach."""
    if stage == "bottleneck" and mode == "global":
        return min(global_highest(widths, unit) for widths, unit, _ in _global_scopes(encoder, round_to))
    return min(_local_highest(width, unit) for _, width, unit in _local_widths(encoder, stage, round_to))


def check_ratio_reachable(encoder: ImageEncoderViT, ratio: float, stage: str, mode: str, round_to: int) -> None:
    """Raise ``RatioOutOfReach`` when ``ratio`` would empty a group (local: any block's;
    global bottleneck: a block's floor that the shared budget cannot pay)."""
    if stage == "bottleneck" and mode == "global":
        for widths, unit, what in _global_scopes(encoder, round_to):
            try:
                global_scope_target(widths, unit, ratio, what)
            except RatioOutOfReach as error:  # the ceiling over both scopes, not this one's
                raise RatioOutOfReach(error.reason, highest_ratio(encoder, stage, mode, round_to)) from None
        return
    for name, width, unit in _local_widths(encoder, stage, round_to):
        if int(width * (1 - ratio)) < unit:
            raise RatioOutOfReach(f"pruning ratio {ratio} leaves no channels of the {width}-wide {name}",
                                  highest_ratio(encoder, stage, mode, round_to))
