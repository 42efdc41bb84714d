"""``slimseg.json``: the manifest written beside exported graphs, and reading it back.

Schema (``format_version`` 1)::

    {"format": "slimseg-onnx", "format_version": 1, "slimseg_version": "0.1.0",
     "family": "sam" | "lite-sam", "model_config": {...config.to_dict()...},
     "input_size": 1024, "embedding_shape": [256, 64, 64], "low_res_mask_size": [256, 256],
     "pixel_mean": [...], "pixel_std": [...], "mask_threshold": 0.0, "image_format": "RGB",
     "image_input": "float32" | "uint8", "opset": 17, "exporter": "torchscript",
     "graphs": {"image_encoder": {"file": "image_encoder.onnx", "inputs": {...}, "outputs": {...}},
                "decoder": {...}, "autoppn": {...}},          # autoppn for Lite-SAM only
     "variants": {"float32": {"image_encoder": "image_encoder.onnx", ...},
                  "int8": {...}, "float16": {...}},            # the ones that were written
     "default_variant": "float32" | "int8" | "float16",
     "autoppn": {"top_k": 256, "score_threshold": 0.05} | null,
     "verification": {...max differences per case...}, "int8": {"mask_iou": ...} | absent}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimseg.errors import SlimsegError

MANIFEST_NAME = "slimseg.json"
FORMAT = "slimseg-onnx"
FORMAT_VERSION = 1
VARIANTS = ("float32", "int8", "float16")


def variant_file(graph: str, variant: str) -> str:
    """File name of ``graph`` in ``variant``: image_encoder.onnx, decoder.int8.onnx, ..."""
    return f"{graph}.onnx" if variant == "float32" else f"{graph}.{variant}.onnx"


def write_manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def is_export_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a slimseg ONNX manifest (cheap; nothing is validated)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked enough that the runtime can trust it."""
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SlimsegError(f"{path}: manifest version {manifest.get('format_version')!r} is not supported "
                           f"(this slimseg reads version {FORMAT_VERSION})")
    for variant, files in manifest.get("variants", {}).items():
        for graph, name in files.items():
            if not (folder / name).is_file():
                raise SlimsegError(f"{folder}: the manifest lists {name} ({graph}, {variant}) but the file is missing")
    return manifest
