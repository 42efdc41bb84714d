"""Model zoo: named models, checkpoint formats and the loading API."""

from slimseg.zoo.loading import build_model, load_model, save_model
from slimseg.zoo.registry import list_models

__all__ = ["build_model", "list_models", "load_model", "save_model"]
