"""The optional ``export`` extra: onnx and onnxruntime, imported only when needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from slimseg.errors import SlimsegError

INSTALL_HINT = "pip install 'slimseg[export]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (onnx, onnxruntime, ...) or raise one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise SlimsegError(f"{purpose} needs the {top} package, which is not installed: {INSTALL_HINT}") from None
