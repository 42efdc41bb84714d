"""Resolving ``--device`` strings before any model is loaded."""

from __future__ import annotations

import re

import torch

from slimseg.errors import SlimsegError, UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_CUDA_PATTERN = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a usable ``torch.device``.

    ``auto`` picks CUDA when it is available and the CPU otherwise. A device that does not
    exist on this machine raises :class:`SlimsegError` at once, so that no model is
    downloaded or loaded for nothing.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SlimsegError("device 'mps' is not available on this machine")
        return torch.device("mps")
    match = _CUDA_PATTERN.match(text)
    if match is None:
        raise UsageError(f"unknown device {spec!r}: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise SlimsegError(f"device {spec!r} requested but CUDA is not available on this machine")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise SlimsegError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA and MPS kernels run asynchronously, so a
    clock read without this would time the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
