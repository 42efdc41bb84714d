"""Inference precision: ``--dtype float32|bfloat16|float16`` as an autocast context.

float32 runs the model as it is. bfloat16 and float16 run it under ``torch.autocast``:
matrix products and convolutions in the low precision, reductions (softmax, layer norm) in
float32, and every output the caller sees is cast back to float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from slimseg.errors import SlimsegError, UsageError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or the torch dtype itself; None is float32)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise SlimsegError(f"unsupported dtype {name}: use one of {', '.join(DTYPE_CHOICES)}")
        return name
    dtype = _DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Run the enclosed model calls at ``dtype`` on ``device`` (a no-op for float32)."""
    if dtype == torch.float32:
        yield
        return
    if device.type not in ("cpu", "cuda"):
        raise SlimsegError(f"dtype {dtype_name(dtype)} is supported on cpu and cuda, not on {device.type}")
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
