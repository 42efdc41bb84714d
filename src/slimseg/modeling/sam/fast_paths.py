"""A switch between the fast inference paths and the plain computation they replace.

The fast paths (relative-position bias built in chunks, projections folded onto the few
prompt tokens, the first decoder layer's image side shared by all prompts, upscaling as
per-token matrix products) compute what the plain graph computes, up to float rounding.
``plain_compute()`` turns them off: tests compare the two, and MAC budgets count the plain
graph, the way the papers count an architecture.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch

_state = {"enabled": True}


def fast_paths_enabled() -> bool:
    return _state["enabled"]


def chunked_cpu_inference(x: torch.Tensor) -> bool:
    """Whether code that works in chunks through reused buffers (``out=``) may run on ``x``:
    fast paths on, ``x`` on the CPU, no gradient to record, not traced or compiled. On CUDA
    the caching allocator already reuses memory and larger kernels pay more than chunks."""
    return (
        fast_paths_enabled()
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.jit.is_tracing()
        and not _is_compiling()
    )


def _is_compiling() -> bool:
    if hasattr(torch.compiler, "is_compiling"):
        return torch.compiler.is_compiling()
    # torch 2.1 and 2.2: torch.compiler.is_compiling arrived in 2.3
    return importlib.import_module("torch._dynamo").is_compiling()


@contextlib.contextmanager
def plain_compute() -> Iterator[None]:
    """Run the enclosed model calls without the fast paths (process-wide, not thread-local)."""
    previous = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous
