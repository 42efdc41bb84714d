"""The resumable state of a distillation run, stored as ``last.ckpt``.

The file is a plain ``torch.save`` of tensors, numbers, strings, lists and dicts only, so
``torch.load(path, weights_only=True)`` reads it without running any pickled code. RNG
states of ``random`` and NumPy are therefore converted to lists rather than pickled tuples.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimseg.errors import SlimsegError
from slimseg.io import atomic_output

__all__ = [
    "CHECKPOINT_VERSION",
    "capture_rng_state",
    "load_training_state",
    "restore_rng_state",
    "save_training_state",
    "weights_fingerprint",
]

CHECKPOINT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state a training step could consume, in weights_only-safe types."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [str(name), keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only where devices exist."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format version) atomically to ``path``."""
    with atomic_output(path) as temporary:
        torch.save({"version": CHECKPOINT_VERSION, **state}, temporary)


def load_training_state(out_dir: Path, mmap: bool = False) -> dict[str, Any]:
    """Read ``out_dir/last.ckpt`` safely (weights_only) onto the CPU; ``mmap`` maps the tensors
    instead of reading them, for a quick look at the run's progress before any model is loaded."""
    path = out_dir / "last.ckpt"
    if not path.is_file():
        raise SlimsegError(f"nothing to resume in {out_dir}: no last.ckpt")
    try:
        with path.open("rb"):  # the file system's complaint (permissions) in its own words
            pass
    except OSError as error:
        raise SlimsegError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # torch raises several types (OSError from mmap too) for truncated or foreign files
        # Not torch's message: it advises weights_only=False (running the file's pickled code)
        # and, for a truncated archive, runs to hundreds of characters of zip internals.
        raise SlimsegError(_corrupt(path)) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise SlimsegError(f"{path}: not a slimseg training checkpoint of version {CHECKPOINT_VERSION}")
    return state


def _corrupt(path: Path) -> str:
    return f"{path}: the checkpoint is corrupt or truncated (not a readable slimseg last.ckpt)"


def weights_fingerprint(modules: Iterable[nn.Module], exclude: nn.Module) -> str:
    """A hash of the parameters and buffers of ``modules`` that ``exclude`` does not hold: the
    weights a run depends on but does not store (a frozen encoder, the teacher), so that a
    resume can tell whether it was given the same ones. Hashing reads each byte once (about a
    second for SAM-B and its teacher), cheap next to an epoch."""
    skipped = {id(tensor) for tensor in exclude.state_dict(keep_vars=True).values()}
    digest = hashlib.blake2b(digest_size=16)
    for position, module in enumerate(modules):
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in skipped or not isinstance(tensor, torch.Tensor):
                continue
            data = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{position}:{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()
