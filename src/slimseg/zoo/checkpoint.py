"""Reading and writing checkpoint files. The format is detected from the bytes, never from
the file name, and nothing in a file is ever executed (``weights_only=True``)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from slimseg import __version__
from slimseg.errors import SlimsegError
from slimseg.io import atomic_output
from slimseg.zoo.families import Model, ModelConfig, config_from_json
from slimseg.zoo.hf_layout import apply_hf_config, hf_to_sam_layout, looks_like_hf_state_dict, read_hf_config
from slimseg.zoo.pickled import read_pickled_module_state, strip_data_parallel
from slimseg.zoo.sam_layout import StateDict, infer_sam_config, looks_like_sam_state_dict, split_fused_qkv

NATIVE_FORMAT = "slimseg"
CONFIG_METADATA_KEY = "slimseg.config"
FORMAT_METADATA_KEY = "slimseg.format"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ONNX_MANIFEST = "slimseg.json"  # slimseg.export.manifest.MANIFEST_NAME, not imported: zoo needs no export code


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Tensors in slimseg's key layout plus the architecture they belong to."""

    state_dict: StateDict
    config: ModelConfig
    format: str  # slimseg | segment-anything | transformers | pickled-model


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 0 < header_length < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise SlimsegError(f"{path}: corrupt or truncated safetensors file ({error})") from None


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A torch file's tensors: a state dict through ``weights_only``, or a pickled whole model
    through slimseg's restricted unpickler, which imports and runs nothing from the file."""
    try:
        # A file object, not the path: torch.load would pick a loader by the file's suffix.
        with path.open("rb") as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return read_pickled_module_state(path), "pickled-model"
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SlimsegError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    for key in _NESTED_STATE_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise SlimsegError(f"{path}: not a state dict of tensors")
    return payload, "segment-anything"


def weights_file(path: Path) -> Path:
    """The file holding the weights: ``path`` itself, or the weights file of a SamModel folder."""
    if not path.is_dir():
        return path
    for name in _HF_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    if (path / _ONNX_MANIFEST).is_file():
        # the folder given to `segment --model` without `--backend onnx`: say what was meant
        raise SlimsegError(f"{path}: a slimseg ONNX export (it has {_ONNX_MANIFEST}), not a checkpoint: run it with "
                           "--backend onnx (in Python: slimseg.export.runtime.OnnxSam)")
    raise SlimsegError(f"{path}: folder holds no {' or '.join(_HF_WEIGHT_FILES)}")


def _to_slimseg_layout(path: Path, tensors: dict[str, torch.Tensor], fmt: str, source: Path) -> LoadedCheckpoint:
    tensors = strip_data_parallel(tensors)
    hf_config = None
    if looks_like_hf_state_dict(tensors):
        tensors, fmt = hf_to_sam_layout(tensors), "transformers"
        hf_config = read_hf_config(source)
    if not looks_like_sam_state_dict(tensors):
        raise SlimsegError(f"{path}: unrecognised checkpoint layout (no SAM image encoder and mask decoder tensors)")
    state_dict = split_fused_qkv({k: v for k, v in tensors.items() if k not in ("pixel_mean", "pixel_std")})
    config = apply_hf_config(infer_sam_config(state_dict), hf_config, source)
    return LoadedCheckpoint(state_dict, config, fmt)


@contextmanager
def errors_naming(source: str | Path) -> Iterator[None]:
    """Make every SlimsegError raised inside start with ``source``: deep in a checkpoint's
    layout or config the code no longer knows which file it reads, and a user with several
    checkpoints needs to. Messages that already start with it are left as they are."""
    try:
        yield
    except SlimsegError as error:
        message = str(error)
        if message.startswith(str(source)):
            raise
        raise type(error)(f"{source}: {message}") from error


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint of any supported format into slimseg's layout; see docs/models.md.

    The format comes from the bytes: slimseg safetensors (config in the metadata),
    segment-anything state dicts (fused or split q/k/v, ``.pth`` or safetensors), transformers
    SamModel files or folders, and pickled whole models such as SlimSAM's original release.
    Every SlimsegError names the checkpoint first.
    """
    with errors_naming(path):
        return _read_checkpoint(Path(path))


def _read_checkpoint(source: Path) -> LoadedCheckpoint:
    if not source.exists():
        raise SlimsegError(f"{source}: no such checkpoint file")
    path = weights_file(source)
    with path.open("rb") as handle:
        head = handle.read(16)
    if _is_safetensors(head):
        tensors, metadata = _read_safetensors(path)
        if CONFIG_METADATA_KEY in metadata:
            return LoadedCheckpoint(tensors, config_from_json(metadata[CONFIG_METADATA_KEY]), NATIVE_FORMAT)
        return _to_slimseg_layout(path, tensors, "segment-anything", source)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        tensors, fmt = _read_torch(path)
        return _to_slimseg_layout(path, tensors, fmt, source)
    if not head:
        raise SlimsegError(f"{path}: empty file, not a checkpoint")
    raise SlimsegError(f"{path}: not a checkpoint (neither safetensors nor a torch file)")


def load_state_dict_strict(model: Model, state_dict: StateDict, source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the offending keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise SlimsegError(f"{source}: weights do not fit the architecture ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint(model: Model, path: str | Path) -> Path:
    """Write ``model`` as slimseg safetensors (config in the metadata), atomically."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        FORMAT_METADATA_KEY: "1",
        CONFIG_METADATA_KEY: model.config.to_json(),
        "slimseg.version": __version__,
    }
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path
