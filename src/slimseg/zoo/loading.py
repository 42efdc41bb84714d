"""``load_model`` / ``build_model`` / ``save_model``: the public entry points of the zoo."""

from __future__ import annotations

from pathlib import Path

import torch

from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError, UsageError
from slimseg.zoo.families import Model, ModelConfig, is_model, model_from_config
from slimseg.zoo.checkpoint import errors_naming, load_state_dict_strict, read_checkpoint, save_checkpoint
from slimseg.zoo.download import download_file, mirror_url
from slimseg.zoo.registry import ModelSpec, cache_path, get_spec, is_model_name, spec_config


def build_model(name_or_config: str | ModelConfig, device: str | torch.device = "cpu") -> Model:
    """A randomly initialised model of a registered architecture (or of an explicit config)."""
    config = spec_config(get_spec(name_or_config)) if isinstance(name_or_config, str) else name_or_config
    return model_from_config(config).to(resolve_device(device)).eval()


def fetch_weights(spec: ModelSpec, offline: bool = False) -> Path:
    """The cached weight file of a named model, downloaded and verified first if missing."""
    path = cache_path(spec)
    if spec.weights is None or path is None:
        raise SlimsegError(f"{spec.name} has no weights to download: {spec.how_to_get}")
    if path.is_file():
        return path
    return download_file(mirror_url(spec.weights.url, spec.weights.filename), path, spec.weights.sha256,
                         offline=offline)


def resolve_checkpoint(name_or_path: str | Path, offline: bool = False) -> Path:
    """A checkpoint path for a registry name (fetching it if needed) or an existing path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if is_model_name(text):
        return fetch_weights(get_spec(text), offline=offline)
    raise SlimsegError(f"{text}: neither a registered model name nor an existing checkpoint file")


def load_model(name_or_path: str | Path, device: str | torch.device = "auto", offline: bool = False) -> Model:
    """Load a model by registry name or from a checkpoint file or folder, in eval mode on ``device``.

    The device is checked before anything is read or downloaded. Registered weights are
    downloaded into the cache on first use (``offline=True`` or ``SLIMSEG_OFFLINE=1`` forbids
    it). Checkpoint formats are detected from the content (see docs/models.md).
    """
    target = resolve_device(device)
    path = resolve_checkpoint(name_or_path, offline=offline)
    return _model_from_checkpoint(path)[0].to(target).eval()


def _model_from_checkpoint(path: Path) -> tuple[Model, str]:
    """The model a checkpoint file or folder holds (on the CPU) and the checkpoint's format;
    every error names the checkpoint first."""
    with errors_naming(path):
        checkpoint = read_checkpoint(path)
        model = model_from_config(checkpoint.config)
        load_state_dict_strict(model, checkpoint.state_dict, path)
    return model, checkpoint.format


def save_model(model: Model, path: str | Path) -> Path:
    """Save in slimseg's format: safetensors with the full architecture in its metadata."""
    if not is_model(model):
        raise SlimsegError(f"save_model expects a slimseg model (Sam or LiteSam), got {type(model).__name__}")
    return save_checkpoint(model, path)


def convert_checkpoint(name_or_path: str | Path, out: str | Path, offline: bool = False) -> dict[str, str]:
    """Any supported checkpoint (or registry name) → slimseg safetensors at ``out``.

    Returns {"source": checkpoint path, "format": its detected format, "out": written path}.
    Shared by ``slimseg convert`` and ``slimseg export --format safetensors``.
    """
    out = Path(out)
    path = resolve_checkpoint(name_or_path, offline=offline)
    if out.exists() and out.resolve() == path.resolve():
        raise UsageError(f"--out {out} would overwrite the checkpoint being converted")
    model, fmt = _model_from_checkpoint(path)  # the file is read once
    written = save_model(model.eval(), out)
    return {"source": str(path), "format": fmt, "out": str(written)}
