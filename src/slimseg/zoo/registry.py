"""Named models: architecture, where the weights come from, and their licence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimseg.errors import SlimsegError
from slimseg.modeling.sam import SamConfig, sam_b_config, sam_h_config, sam_l_config

_META_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    config: Callable[[], SamConfig]
    filename: str | None  # file name in the cache; None when no weights are published
    url: str | None
    license: str


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("sam-b", "Segment Anything ViT-B (Meta)", sam_b_config, "sam_vit_b_01ec64.pth",
                  _META_BASE + "sam_vit_b_01ec64.pth", "Apache-2.0"),
        ModelSpec("sam-l", "Segment Anything ViT-L (Meta)", sam_l_config, "sam_vit_l_0b3195.pth",
                  _META_BASE + "sam_vit_l_0b3195.pth", "Apache-2.0"),
        ModelSpec("sam-h", "Segment Anything ViT-H (Meta)", sam_h_config, "sam_vit_h_4b8939.pth",
                  _META_BASE + "sam_vit_h_4b8939.pth", "Apache-2.0"),
    )
}


def list_models() -> list[str]:
    """Names accepted by :func:`slimseg.load_model` and :func:`slimseg.build_model`."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise SlimsegError(f"unknown model {name!r}: choose one of {', '.join(list_models())} or give a checkpoint path") from None


def is_model_name(text: str) -> bool:
    return text.lower() in _REGISTRY


def cache_dir() -> Path:
    """``$SLIMSEG_HOME``, else ``$XDG_CACHE_HOME/slimseg``, else ``~/.cache/slimseg``."""
    if os.environ.get("SLIMSEG_HOME"):
        return Path(os.environ["SLIMSEG_HOME"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "slimseg"
    return Path.home() / ".cache" / "slimseg"


def cached_weights(spec: ModelSpec) -> Path:
    """The cached weight file of a named model, or a one-line error saying how to get it."""
    if spec.filename is None:
        raise SlimsegError(f"{spec.name} has no published weights")
    path = cache_dir() / spec.filename
    if not path.is_file():
        raise SlimsegError(
            f"weights for {spec.name} are not in the cache: download {spec.url} to {path} "
            "(or pass the checkpoint path to --model)"
        )
    return path
