"""Reading and writing checkpoint files. The format is detected from the bytes, never from
the file name, and nothing in a file is ever executed (``weights_only=True``)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimseg import __version__
from slimseg.errors import SlimsegError
from slimseg.io import atomic_output
from slimseg.modeling.sam import Sam, SamConfig
from slimseg.zoo.sam_layout import StateDict, infer_sam_config, looks_like_sam_state_dict, split_fused_qkv

NATIVE_FORMAT = "slimseg"
CONFIG_METADATA_KEY = "slimseg.config"
FORMAT_METADATA_KEY = "slimseg.format"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Tensors in slimseg's key layout plus the architecture they belong to."""

    state_dict: StateDict
    config: SamConfig
    format: str  # "slimseg" | "segment-anything"


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 0 < header_length < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> LoadedCheckpoint:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise SlimsegError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    if CONFIG_METADATA_KEY in metadata:
        return LoadedCheckpoint(tensors, SamConfig.from_json(metadata[CONFIG_METADATA_KEY]), NATIVE_FORMAT)
    return _from_sam_layout(path, tensors)


def _read_torch(path: Path) -> LoadedCheckpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SlimsegError(
            f"{path}: holds pickled Python objects (a whole model saved with torch.save(model)?), "
            "which slimseg refuses to unpickle; save its state_dict() instead"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SlimsegError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    for key in _NESTED_STATE_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise SlimsegError(f"{path}: not a state dict of tensors")
    return _from_sam_layout(path, payload)


def _from_sam_layout(path: Path, tensors: dict[str, torch.Tensor]) -> LoadedCheckpoint:
    if not looks_like_sam_state_dict(tensors):
        raise SlimsegError(f"{path}: unrecognised checkpoint layout (no image_encoder/mask_decoder keys)")
    state_dict = split_fused_qkv({k: v for k, v in tensors.items() if k not in ("pixel_mean", "pixel_std")})
    return LoadedCheckpoint(state_dict, infer_sam_config(state_dict), "segment-anything")


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint file of any supported format into slimseg's layout.

    Supported: slimseg safetensors (config in the metadata), segment-anything state dicts
    (``.pth``, fused or split q/k/v) and SAM-layout safetensors without metadata.
    """
    path = Path(path)
    if not path.exists():
        raise SlimsegError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise SlimsegError(f"{path}: is a directory, not a checkpoint file")
    with path.open("rb") as handle:
        head = handle.read(16)
    if _is_safetensors(head):
        return _read_safetensors(path)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return _read_torch(path)
    if not head:
        raise SlimsegError(f"{path}: empty file, not a checkpoint")
    raise SlimsegError(f"{path}: not a checkpoint (neither safetensors nor a torch file)")


def load_state_dict_strict(model: Sam, state_dict: StateDict, source: str | Path) -> None:
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


def save_checkpoint(model: Sam, path: str | Path) -> Path:
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
