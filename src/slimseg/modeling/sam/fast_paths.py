"""A switch between the fast inference paths and the plain computation they replace.

The fast paths (relative-position bias built in chunks, projections folded onto the few
prompt tokens, the first decoder layer's image side shared by all prompts, upscaling as
per-token matrix products) compute what the plain graph computes, up to float rounding.
``plain_compute()`` turns them off: tests compare the two, and MAC budgets count the plain
graph, the way the papers count an architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_state = {"enabled": True}


def fast_paths_enabled() -> bool:
    return _state["enabled"]


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether the CPU inference paths may run on ``x``: fast paths on, ``x`` on the CPU, no
    gradient to record, not traced for export. Compiled graphs qualify, but reach those paths
    only through registered custom ops (see rel_pos.py)."""
    return (
        fast_paths_enabled()
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.jit.is_tracing()
    )


def chunked_cpu_inference(x: torch.Tensor) -> bool:
    """Whether code that works in chunks through reused buffers (``out=``) may run on ``x``:
    :func:`cpu_inference`, and not being compiled, where such loops would be traced. On CUDA
    the caching allocator already reuses memory and larger kernels pay more than chunks."""
    return cpu_inference(x) and not is_compiling()


def is_compiling() -> bool:
    """Whether torch.compile is tracing the calling code."""
    return torch.compiler.is_compiling()


def plain_compute() -> contextlib.AbstractContextManager[None]:
    """Run the enclosed model calls without the fast paths (process-wide, not thread-local)."""
    return switched_off(_state)


@contextlib.contextmanager
def switched_off(state: dict[str, object]) -> Iterator[None]:
    """``state["enabled"]`` False for the enclosed block, then as it was: the switch behind
    :func:`plain_compute` and the native kernels' ``native_kernels_disabled``."""
    previous = state["enabled"]
    state["enabled"] = False
    try:
        yield
    finally:
        state["enabled"] = previous
