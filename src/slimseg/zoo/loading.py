"""``load_model`` / ``build_model`` / ``save_model``: the public entry points of the zoo."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.io import refuse_overwriting_inputs
from slimseg.zoo.families import Model, ModelConfig, is_model, model_from_config
from slimseg.zoo.checkpoint import (
    checkpoint_files,
    errors_naming,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from slimseg.zoo.download import download_file, mirror_url
from slimseg.zoo.registry import (
    ModelSpec,
    architecture_mismatch,
    cache_path,
    get_spec,
    is_model_name,
    names_hint,
    spec_config,
    stale_cache_hint,
)

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def build_model(name_or_config: str | ModelConfig, device: str | torch.device = "cpu") -> Model:
    """A randomly initialised model of a registered architecture (or of an explicit config)."""
    target = resolve_device(device)  # before building: sam-h alone is 641 M parameters
    if isinstance(name_or_config, (str, os.PathLike)):
        config = spec_config(_spec_to_build(os.fspath(name_or_config)))
    else:
        config = name_or_config
    return model_from_config(config).to(target).eval()


def _spec_to_build(text: str) -> ModelSpec:
    if is_model_name(text):
        return get_spec(text)
    if "/" in text or os.sep in text or text.lower().endswith(_CHECKPOINT_SUFFIXES) or Path(text).expanduser().exists():
        raise SlimsegError(f"build_model({text!r}): build_model makes a randomly initialised model of a registered "
                           "architecture and reads no file; to load a checkpoint, use load_model(path)")
    return get_spec(text)


def fetch_weights(spec: ModelSpec, offline: bool = False) -> Path:
    """The cached weight file of a named model, downloaded and verified first if missing."""
    path = cache_path(spec)
    if spec.weights is None or path is None:
        raise SlimsegError(f"{spec.name} has no weights to download: {spec.how_to_get}")
    if path.is_file():
        return path
    return download_file(mirror_url(spec.weights.url, spec.weights.filename), path, spec.weights.sha256,
                         offline=offline)


@dataclass(frozen=True)
class _Source:
    """A checkpoint to read, and what the user meant by the text that named it."""

    path: Path
    spec: ModelSpec | None = None  # set when ``path`` is the cached download of this registered model
    shadowed: str | None = None  # a registered name that an existing local path of the same name hides


def _resolve(name_or_path: str | Path, offline: bool) -> _Source:
    text = os.fspath(name_or_path)
    if not text.strip():
        # Path("") is the current folder, which would be read as a checkpoint folder
        raise SlimsegError(f"empty model name or path: give a checkpoint path or a registered name; {names_hint('')}")
    path = Path(text).expanduser()
    # Paths first, as transformers' from_pretrained does; a failure says what the path hides.
    if path.exists():
        return _Source(path, shadowed=text if is_model_name(text) else None)
    if is_model_name(text):
        spec = get_spec(text)
        return _Source(fetch_weights(spec, offline=offline), spec=spec)
    raise SlimsegError(f"{text}: neither a registered model name nor an existing checkpoint file; {names_hint(text)}")


def load_model(name_or_path: str | Path, device: str | torch.device = "auto", offline: bool = False) -> Model:
    """Load a model by registry name or from a checkpoint file or folder, in eval mode on ``device``.

    The device is checked before anything is read or downloaded. Registered weights are
    downloaded into the cache on first use (``offline=True`` or ``SLIMSEG_OFFLINE=1`` forbids
    it). Checkpoint formats are detected from the content (see docs/models.md). An existing
    path wins over a registered name spelled the same.
    """
    target = resolve_device(device)
    source = _resolve(name_or_path, offline=offline)
    return _model_from_checkpoint(source)[0].to(target).eval()


def _model_from_checkpoint(source: _Source) -> tuple[Model, str]:
    """The model a checkpoint file or folder holds (on the CPU) and the checkpoint's format;
    every error names the checkpoint first."""
    with _explained(source):
        checkpoint = read_checkpoint(source.path)
        problem = architecture_mismatch(source.spec, checkpoint.config) if source.spec else None
        if problem:
            raise SlimsegError(f"{source.path}: {problem}")
        model = model_from_config(checkpoint.config)
        load_state_dict_strict(model, checkpoint.state_dict, source.path)
    return model, checkpoint.format


@contextmanager
def _explained(source: _Source) -> Iterator[None]:
    """Name the checkpoint first in every error, and add what the user can do when the file is
    a registered model's cached download (delete it) or hides a registered name."""
    try:
        with errors_naming(source.path):
            yield
    except SlimsegError as error:
        if source.spec is not None:
            hint = stale_cache_hint(source.spec)
        elif source.shadowed is not None:
            kind = "folder" if source.path.is_dir() else "file"
            hint = (f"the local {kind} {source.shadowed!r} shadows the registered model {source.shadowed}: "
                    "rename it, or load from another folder, to get the registered model")
        else:
            raise
        raise type(error)(f"{error}; {hint}") from error


def save_model(model: Model, path: str | Path) -> Path:
    """Save in slimseg's format: safetensors with the full architecture in its metadata.
    ``~`` is expanded; a folder or an unwritable location is refused with a SlimsegError."""
    if not is_model(model):
        raise SlimsegError(f"save_model expects a slimseg model (Sam or LiteSam), got {type(model).__name__}")
    return save_checkpoint(model, path)


def convert_checkpoint(name_or_path: str | Path, out: str | Path, offline: bool = False) -> dict[str, str]:
    """Any supported checkpoint (or registry name) → slimseg safetensors at ``out``.

    Returns {"source": checkpoint path, "format": its detected format, "out": written path}.
    Shared by ``slimseg convert`` and ``slimseg export --format safetensors``.
    """
    out = Path(out).expanduser()
    source = _resolve(name_or_path, offline=offline)
    with _explained(source):
        read = checkpoint_files(source.path)
    refuse_overwriting_inputs(out, read, "--out")
    model, fmt = _model_from_checkpoint(source)  # the file is read once
    written = save_model(model.eval(), out)
    return {"source": str(source.path), "format": fmt, "out": str(written)}
