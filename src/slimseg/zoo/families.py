"""Model families: which config class and module a serialized config describes."""

from __future__ import annotations

import json
from typing import Union

from torch import nn

from slimseg.errors import SlimsegError
from slimseg.modeling.lite_sam import LiteSam, LiteSamConfig
from slimseg.modeling.sam import Sam, SamConfig

ModelConfig = Union[SamConfig, LiteSamConfig]
Model = Union[Sam, LiteSam]
_FAMILIES = {"sam": (SamConfig, Sam), "lite-sam": (LiteSamConfig, LiteSam)}


def config_from_json(text: str) -> ModelConfig:
    """Rebuild a config written by ``config.to_json()``, whatever its family."""
    try:
        family = json.loads(text).get("family", "sam")
    except (json.JSONDecodeError, AttributeError) as error:
        raise SlimsegError(f"invalid model config JSON: {error}") from None
    if family not in _FAMILIES:
        raise SlimsegError(f"unknown model family {family!r} in config: slimseg knows {', '.join(_FAMILIES)}")
    return _FAMILIES[family][0].from_json(text)


def model_from_config(config: ModelConfig) -> Model:
    """A randomly initialised module of the config's family."""
    for config_class, model_class in _FAMILIES.values():
        if isinstance(config, config_class):
            return model_class(config)
    raise SlimsegError(f"not a model config: {type(config).__name__}")


def is_model(module: nn.Module) -> bool:
    return isinstance(module, tuple(model for _, model in _FAMILIES.values()))
