"""``load_model`` / ``build_model`` / ``save_model``: the public entry points of the zoo."""

from __future__ import annotations

from pathlib import Path

import torch

from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import Sam, SamConfig
from slimseg.zoo.checkpoint import load_state_dict_strict, read_checkpoint, save_checkpoint
from slimseg.zoo.registry import cached_weights, get_spec, is_model_name


def build_model(name_or_config: str | SamConfig, device: str | torch.device = "cpu") -> Sam:
    """A randomly initialised model of a registered architecture (or of an explicit config)."""
    config = name_or_config if isinstance(name_or_config, SamConfig) else get_spec(name_or_config).config()
    return Sam(config).to(resolve_device(device)).eval()


def load_model(name_or_path: str | Path, device: str | torch.device = "auto") -> Sam:
    """Load a model by registry name or from a checkpoint file, in eval mode on ``device``.

    The device is checked before anything is read. Checkpoint formats are detected from
    the file content (see :mod:`slimseg.zoo.checkpoint`).
    """
    target = resolve_device(device)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and is_model_name(text):
        path = cached_weights(get_spec(text))
    elif not path.exists():
        raise SlimsegError(f"{text}: neither a registered model name nor an existing checkpoint file")
    checkpoint = read_checkpoint(path)
    model = Sam(checkpoint.config)
    load_state_dict_strict(model, checkpoint.state_dict, path)
    return model.to(target).eval()


def save_model(model: Sam, path: str | Path) -> Path:
    """Save in slimseg's format: safetensors with the full architecture in its metadata."""
    if not isinstance(model, Sam):
        raise SlimsegError(f"save_model expects a slimseg Sam model, got {type(model).__name__}")
    return save_checkpoint(model, path)
