"""Parameter and multiply-accumulate counts, measured on the meta device (no memory, no math)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimseg.modeling.sam.fast_paths import plain_compute

_LAYER_OPS = frozenset({"convolution", "_convolution", "addmm", "linear"})


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass, split the way the papers count them:
    ``layers`` (convolutions and linear layers, SlimSAM's and Lite-SAM's convention) and
    ``attention`` (the q·k and attention·v products and relative-position terms)."""

    layers: int
    attention: int

    @property
    def total(self) -> int:
        return self.layers + self.attention


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> MacCount:
    """MACs of ``module(*inputs)``; run it on meta-device copies to count without computing.

    The plain graph is counted (see :mod:`slimseg.modeling.sam.fast_paths`): the
    architecture's MACs, as the papers count them, whatever shortcuts inference takes.
    """
    with plain_compute(), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    layers = attention = 0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if str(op).rsplit(".", 1)[-1] in _LAYER_OPS:
            layers += flops // 2
        else:
            attention += flops // 2
    return MacCount(layers=layers, attention=attention)
