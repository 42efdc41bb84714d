"""``slimseg.json``: the manifest written beside exported graphs, and reading it back.

Schema (``format_version`` 1)::

    {"format": "slimseg-onnx", "format_version": 1, "slimseg_version": "0.1.0", "source": "slimsam-77",
     "family": "sam" | "lite-sam", "model_config": {...config.to_dict()...},
     "input_size": 1024, "embedding_shape": [256, 64, 64], "low_res_mask_size": [256, 256],
     "pixel_mean": [...], "pixel_std": [...], "mask_threshold": 0.0, "image_format": "RGB",
     "image_input": "float32" | "uint8", "opset": 17,
     "exporter": "torch.onnx TorchScript exporter (torch 2.x)",
     "graphs": {"image_encoder": {"file": "image_encoder.onnx", "inputs": {...}, "outputs": {...},
                                  "variants": {"float16": {"file": ..., "dtypes": {...}}, ...}},
                "decoder": {...}, "autoppn": {...}},          # autoppn for Lite-SAM only
     "variants": {"float32": {"image_encoder": "image_encoder.onnx", ...},
                  "int8": {...}, "float16": {...}},            # the ones that were written
     "default_variant": "float32" | "int8" | "float16",
     "autoppn": {"top_k": 256, "score_threshold": 0.05} | null,
     "verification": {"tolerance_rel": {...}, "diffs": {variant: {case: {output: {"max_abs", "rel"}}}},
                      "int8_mask_iou": ..., "int8_mask_iou_floor": 0.5},   # the int8 keys when quantised
     "seconds": {"export": ..., "verify": ...}}

A graph's ``inputs``/``outputs`` give the float32 file's shapes and dtypes; its ``variants``
give every written file's input and output dtypes (float16 encoders take float16).
``read_manifest`` checks every field the runtime reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from slimseg.errors import SlimsegError
from slimseg.validation import is_finite_number

MANIFEST_NAME = "slimseg.json"
FORMAT = "slimseg-onnx"
FORMAT_VERSION = 1
VARIANTS = ("float32", "int8", "float16")


def variant_file(graph: str, variant: str) -> str:
    """File name of ``graph`` in ``variant``: image_encoder.onnx, decoder.int8.onnx, ..."""
    return f"{graph}.onnx" if variant == "float32" else f"{graph}.{variant}.onnx"


def write_manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


GRAPHS = ("image_encoder", "decoder", "autoppn")
_REQUIRED_GRAPHS = ("image_encoder", "decoder")


class _Invalid(Exception):
    """A manifest field that the runtime cannot use; read_manifest adds the path."""


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _ints(count: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == count and all(_is_int(n) and n > 0 for n in v)


def _numbers(count: int, positive: bool = False) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) == count
                      and all(is_finite_number(n) and (n > 0 or not positive) for n in v))


def _field(manifest: dict[str, Any], name: str, valid: Callable[[Any], bool], expected: str) -> Any:
    if name not in manifest:
        raise _Invalid(f"{name} is missing (expected {expected})")
    if not valid(manifest[name]):
        raise _Invalid(f"{name} must be {expected}, got {_shown(manifest[name])}")
    return manifest[name]


def is_plain_file_name(name: Any) -> bool:
    """A file name with no folder part: graphs must lie in the export folder itself."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_variants(manifest: dict[str, Any], folder: Path) -> None:
    variants = _field(manifest, "variants", lambda v: isinstance(v, dict) and len(v) > 0,
                      "an object {variant: {graph: file name}}")
    root = folder.resolve()
    for variant, files in variants.items():
        where = f"variants.{variant}"
        if variant not in VARIANTS:
            raise _Invalid(f"{where}: unknown variant (expected {', '.join(VARIANTS)})")
        if not isinstance(files, dict):
            raise _Invalid(f"{where} must be an object {{graph: file name}}, got {_shown(files)}")
        for graph in _REQUIRED_GRAPHS:
            if graph not in files:
                raise _Invalid(f"{where}.{graph} is missing")
        for graph, name in files.items():
            if graph not in GRAPHS:
                raise _Invalid(f"{where}.{graph}: unknown graph (expected {', '.join(GRAPHS)})")
            if not is_plain_file_name(name):
                raise _Invalid(f"{where}.{graph} must be a file name in the export folder, got {_shown(name)}")
            path = folder / name
            if not path.is_file():
                raise _Invalid(f"{where}.{graph}: {name} is missing or not a file")
            # a symlink planted in the folder must not lead the runtime elsewhere either
            if path.resolve().parent != root:
                raise _Invalid(f"{where}.{graph}: {name} leads outside the export folder")
    _field(manifest, "default_variant", lambda v: isinstance(v, str) and v in variants,
           f"one of the exported variants: {', '.join(variants)}")
    if any("autoppn" in files for files in variants.values()):
        _field(manifest, "autoppn", lambda v: isinstance(v, dict) and _is_int(v.get("top_k")) and v["top_k"] > 0
               and is_finite_number(v.get("score_threshold")), '{"top_k": positive integer, "score_threshold": number}')


def _check_fields(manifest: dict[str, Any], folder: Path) -> None:
    """Every field the runtime (OnnxSam) reads, with its type."""
    _field(manifest, "input_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    _field(manifest, "embedding_shape", _ints(3), "[channels, height, width], positive integers")
    _field(manifest, "low_res_mask_size", _ints(2), "[height, width], positive integers")
    _field(manifest, "pixel_mean", _numbers(3), "3 numbers")
    _field(manifest, "pixel_std", _numbers(3, positive=True), "3 positive numbers")
    _field(manifest, "mask_threshold", is_finite_number, "a number")
    _field(manifest, "image_format", lambda v: v in ("RGB", "BGR"), '"RGB" or "BGR"')
    _field(manifest, "image_input", lambda v: v in ("float32", "uint8"), '"float32" or "uint8"')
    _check_variants(manifest, folder)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked enough that the runtime can trust it: every
    field it reads has the right type, and every graph file is a plain file in ``folder``."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise SlimsegError(f"{folder}: not a folder: the ONNX backend needs the folder written by `slimseg export`")
    if not path.is_file():
        raise SlimsegError(f"{folder}: no {MANIFEST_NAME} here: not a folder written by `slimseg export --format onnx`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SlimsegError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlimsegError(f"{path}: not a slimseg ONNX manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise SlimsegError(f"{path}: manifest version {_shown(version)} is not supported "
                           f"(this slimseg reads version {FORMAT_VERSION})")
    try:
        _check_fields(manifest, folder)
    except _Invalid as error:
        raise SlimsegError(f"{path}: {error}") from None
    return manifest
