"""slimseg: small and fast Segment Anything."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from slimseg.errors import SlimsegError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slimseg.inference.everything import MaskGenerator
    from slimseg.inference.predictor import Predictor
    from slimseg.modeling.sam import Sam, SamConfig
    from slimseg.zoo import build_model, list_models, load_model, save_model

# The public names import torch and the model code on first use, not with the package: the
# `slimseg` command imports its own modules under a Ctrl-C handler (slimseg.cli.main).
_LAZY = {
    "MaskGenerator": "slimseg.inference.everything",
    "Predictor": "slimseg.inference.predictor",
    "Sam": "slimseg.modeling.sam",
    "SamConfig": "slimseg.modeling.sam",
    "build_model": "slimseg.zoo",
    "list_models": "slimseg.zoo",
    "load_model": "slimseg.zoo",
    "save_model": "slimseg.zoo",
}

__all__ = [
    "MaskGenerator",
    "Predictor",
    "Sam",
    "SamConfig",
    "SlimsegError",
    "__version__",
    "build_model",
    "list_models",
    "load_model",
    "save_model",
]


if not TYPE_CHECKING:  # type checkers see the imports above; a typo must stay an error for them

    def __getattr__(name: str) -> object:
        """A public name, or a subpackage (``slimseg.zoo``), imported on first use."""
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
        elif importlib.util.find_spec(f"slimseg.{name}") is not None:
            value = importlib.import_module(f"slimseg.{name}")
        else:
            raise AttributeError(f"module 'slimseg' has no attribute {name!r}")
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
