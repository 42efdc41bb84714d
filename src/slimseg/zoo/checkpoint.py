"""Reading and writing checkpoint files. The format is detected from the bytes, never from
the file name, and nothing in a file is ever executed (``weights_only=True``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import warnings
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
from slimseg.modeling.sam import SamConfig
from slimseg.zoo.families import Model, ModelConfig, config_from_json
from slimseg.zoo.hf_layout import apply_hf_config, hf_to_sam_layout, looks_like_hf_state_dict, read_hf_config
from slimseg.zoo.pickled import read_pickled_checkpoint, strip_data_parallel
from slimseg.zoo.sam_layout import StateDict, infer_sam_config, looks_like_sam_state_dict, split_fused_qkv

NATIVE_FORMAT = "slimseg"
CONFIG_METADATA_KEY = "slimseg.config"
FORMAT_METADATA_KEY = "slimseg.format"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# save_pretrained(max_shard_size=...) writes one of these beside numbered shards
_HF_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_LITE_SAM_MARKERS = ("image_encoder.stem.weight", "autoppn.proj.weight")
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
    """A torch file's tensors: a state dict through ``weights_only``, or (a pickled whole model,
    a training checkpoint holding other objects) through slimseg's restricted unpickler, which
    imports and runs nothing from the file."""
    try:
        # A file object, not the path: torch.load would pick a loader by the file's suffix.
        with path.open("rb") as handle, warnings.catch_warnings():
            # torch warns (two raw lines) about pickle protocols it did not write; the
            # restricted fallback below reads what weights_only cannot
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pickled = read_pickled_checkpoint(path)
        return pickled.state_dict, "pickled-model" if pickled.whole_model else "segment-anything"
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
    """The file holding the weights: ``path`` itself, or the weights file (or the shard index)
    of a SamModel folder."""
    if not path.is_dir():
        return path
    if not os.access(path, os.R_OK | os.X_OK):
        # is_file() below would read "permission denied" as "no such file"
        raise SlimsegError(f"{path}: cannot read the folder (permission denied)")
    for name in (*_HF_WEIGHT_FILES, *_HF_SHARD_INDEXES):
        if (path / name).is_file():
            return path / name
    if (path / _ONNX_MANIFEST).is_file():
        # an export given where a checkpoint is read: segment/segevery --model without
        # --backend onnx, or a command that only runs PyTorch models (info, bench, eval-coco)
        raise SlimsegError(f"{path}: a slimseg ONNX export (it has {_ONNX_MANIFEST}), not a checkpoint: segment and "
                           "segevery run it with --backend onnx (in Python: slimseg.export.runtime.OnnxSam); other "
                           "commands need the checkpoint it was exported from")
    raise SlimsegError(f"{path}: folder holds no {' or '.join(_HF_WEIGHT_FILES)} (nor a sharded "
                       f"{_HF_SHARD_INDEXES[0]})")


def _shard_names(index: Path) -> list[str]:
    """The shard files that a save_pretrained index lists, in the order first named."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise SlimsegError(f"{index}: unreadable shard index ({_first_line(error)})") from None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise SlimsegError(f"{index}: shard index has no weight_map of tensor names to shard files")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        # shards sit beside their index; a path here would read files the folder does not hold
        if Path(name).name != name or name in (".", ".."):
            raise SlimsegError(f"{index}: shard {name!r} is not a file name in the folder")
        if not (index.parent / name).is_file():
            raise SlimsegError(f"{index}: shard {name} is missing")
    return names


def checkpoint_files(source: Path) -> list[Path]:
    """Every file that reading ``source`` opens: the weights (or the shard index and its
    shards) and a transformers ``config.json`` beside them."""
    path = weights_file(source)
    files = [path]
    if path.name in _HF_SHARD_INDEXES:
        files += [path.parent / name for name in _shard_names(path)]
    if (path.parent / "config.json").is_file():
        files.append(path.parent / "config.json")
    return files


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in _shard_names(index):
        shard = index.parent / name
        part = _read_safetensors(shard)[0] if _is_safetensors(_head(shard)) else _read_torch(shard)[0]
        tensors.update(part)
    return tensors


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(16)
    except OSError as error:
        raise SlimsegError(f"{path}: cannot read the file ({error.strerror or _first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _to_slimseg_layout(path: Path, tensors: dict[str, torch.Tensor], fmt: str, source: Path) -> LoadedCheckpoint:
    tensors = strip_data_parallel(tensors)
    hf_config = None
    if looks_like_hf_state_dict(tensors):
        tensors, fmt = hf_to_sam_layout(tensors), "transformers"
        hf_config = read_hf_config(source)
    if not looks_like_sam_state_dict(tensors):
        if any(key in tensors for key in _LITE_SAM_MARKERS):
            raise SlimsegError(f"{path}: Lite-SAM weights without slimseg's metadata; their architecture cannot be "
                               "read from the tensors, so Lite-SAM checkpoints must be in slimseg's format: write "
                               "them with slimseg.save_model(model) rather than torch.save")
        raise SlimsegError(f"{path}: unrecognised checkpoint layout (no SAM image encoder and mask decoder tensors)")
    normalisation = {key: tensors[key] for key in ("pixel_mean", "pixel_std") if key in tensors}
    state_dict = split_fused_qkv({k: v for k, v in tensors.items() if k not in ("pixel_mean", "pixel_std")})
    config = apply_hf_config(infer_sam_config(state_dict), hf_config, source)
    return LoadedCheckpoint(state_dict, _with_normalisation(config, normalisation, path), fmt)


def _with_normalisation(config: SamConfig, tensors: dict[str, torch.Tensor], path: Path) -> SamConfig:
    """Keep a checkpoint's own pixel_mean / pixel_std (segment-anything stores them as buffers)
    instead of silently replacing them with SAM's defaults."""
    values = {}
    for key, tensor in tensors.items():
        if tensor.numel() != 3 or not tensor.is_floating_point():
            raise SlimsegError(f"{path}: {key} must hold 3 floating-point values, got shape {tuple(tensor.shape)}")
        stored = tensor.detach().flatten().float()
        if not torch.equal(stored, torch.tensor(getattr(config, key), dtype=torch.float32)):
            # float32 holds ~7 digits: 123.675 comes back as 123.67500305; keep the digits meant
            values[key] = tuple(float(f"{value:.7g}") for value in stored.tolist())
    if values.get("pixel_std") and min(values["pixel_std"]) <= 0:
        raise SlimsegError(f"{path}: pixel_std must be positive, got {values['pixel_std']}")
    return dataclasses.replace(config, **values) if values else config


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
    if path.name in _HF_SHARD_INDEXES:
        return _to_slimseg_layout(path, _read_shards(path), "segment-anything", source)
    head = _head(path)
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
    path = Path(path).expanduser()
    if path.is_dir():
        raise SlimsegError(f"{path} is a folder: give a file name such as {path / 'model.safetensors'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # mkdir would only say "File exists" or "Not a directory"
        raise SlimsegError(f"cannot write {path}: {ancestor} is a file, not a folder")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        FORMAT_METADATA_KEY: "1",
        CONFIG_METADATA_KEY: model.config.to_json(),
        "slimseg.version": __version__,
    }
    try:
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
    except (OSError, SafetensorError) as error:
        # a missing or read-only folder, a parent that is a file, a full disk: say which path
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        raise SlimsegError(f"cannot write {path}: {reason}") from None
    return path
