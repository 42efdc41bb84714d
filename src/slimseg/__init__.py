"""slimseg: small and fast Segment Anything."""

__version__ = "0.1.0"

from slimseg.errors import SlimsegError  # noqa: E402
from slimseg.inference.everything import MaskGenerator  # noqa: E402
from slimseg.inference.predictor import Predictor  # noqa: E402
from slimseg.modeling.sam import Sam, SamConfig  # noqa: E402
from slimseg.zoo import build_model, list_models, load_model, save_model  # noqa: E402

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
