"""``--backend torch|onnx``: the PyTorch model or an exported folder run by onnxruntime."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import torch
import typer

from slimseg.devices import resolve_device
from slimseg.errors import UsageError
from slimseg.inference.precision import parse_dtype
from slimseg.zoo import load_model


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


BackendOption = Annotated[
    Backend,
    typer.Option("--backend", help="torch: the PyTorch model; onnx: run a folder written by `slimseg export "
                 "--format onnx` (give it as --model) in onnxruntime."),
]


def check_backend_options(backend: Backend, device: str, dtype: str) -> None:
    """The checks of ``--device`` and ``--dtype`` that need no model: commands run them before
    they list their inputs, so that a mistyped option is reported first (exit status 2)."""
    precision = parse_dtype(dtype)
    if backend is Backend.onnx:
        if precision != torch.float32:
            raise UsageError("--dtype applies to --backend torch; an ONNX export runs at the precision it was exported in")
    else:
        resolve_device(device)


def open_model(backend: Backend, model: str, device: str, offline: bool, dtype: str = "float32") -> Any:
    """The torch model, or an ``OnnxSam`` over an export folder (which the Predictor and
    MaskGenerator accept alike). Options that only one backend has are refused first."""
    check_backend_options(backend, device, dtype)  # before any model is read
    if backend is Backend.onnx:
        from slimseg.export.runtime import OnnxSam, providers_for

        return OnnxSam(model, providers=providers_for(device))
    return load_model(model, device=resolve_device(device), offline=offline)
