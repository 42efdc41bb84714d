"""Named models: architecture, where the weights come from, their sha256 and licence."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimseg.errors import SlimsegError
from slimseg.modeling.lite_sam import LiteSamConfig
from slimseg.modeling.sam import SamConfig, sam_b_config, sam_h_config, sam_l_config, sam_vit_config

_META = "https://dl.fbaipublicfiles.com/segment_anything/"
_HUB = "https://huggingface.co/"
_SLIMSAM_PROJECT = "the SlimSAM project (github.com/czg1225/SlimSAM, or the Hugging Face repo Zigeng/SlimSAM)"


@dataclass(frozen=True)
class WeightSource:
    """A downloadable weight file. ``sha256`` pins the file; when it is None the digest that the
    server reports for the file (the Hugging Face hub's ``X-Linked-Etag``) is verified instead."""

    url: str
    filename: str  # name in the cache folder, unique across the registry
    sha256: str | None
    size: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    config: Callable[[], SamConfig | LiteSamConfig] | None  # None: the architecture is read from the user's file
    weights: WeightSource | None
    license: str
    how_to_get: str | None = None  # shown when there is nothing to download
    origin: str = ""  # short human name of where the weights come from

    @property
    def source(self) -> str:
        return self.weights.url if self.weights else (self.how_to_get or "")


def slimsam_50_config() -> SamConfig:
    return sam_vit_config(384, 12, 12, (2, 5, 8, 11), mlp_dim=1536)


def slimsam_77_config() -> SamConfig:
    return sam_vit_config(168, 12, 12, (2, 5, 8, 11), mlp_dim=696)


def _global_slimsam(ratio: int) -> ModelSpec:
    return ModelSpec(
        f"slimsam-{ratio}-global",
        f"SlimSAM-{ratio} original release (global pruning, widths vary per block)",
        None,
        None,
        "Apache-2.0",
        how_to_get=f"download SlimSAM-{ratio}.pth from {_SLIMSAM_PROJECT} and load it by its path "
        "(--model PATH; load_model(path) in Python); it is read without running any of its pickled code",
        origin=f"your SlimSAM-{ratio}.pth",
    )


_SPECS = (
    ModelSpec("sam-b", "Segment Anything ViT-B (Meta)", sam_b_config,
              WeightSource(_META + "sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth",
                           "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
              "Apache-2.0", origin="Meta (dl.fbaipublicfiles.com)"),
    ModelSpec("sam-l", "Segment Anything ViT-L (Meta)", sam_l_config,
              WeightSource(_META + "sam_vit_l_0b3195.pth", "sam_vit_l_0b3195.pth",
                           "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
              "Apache-2.0", origin="Meta (dl.fbaipublicfiles.com)"),
    ModelSpec("sam-h", "Segment Anything ViT-H (Meta)", sam_h_config,
              WeightSource(_META + "sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth",
                           "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
              "Apache-2.0", origin="Meta (dl.fbaipublicfiles.com)"),
    ModelSpec("slimsam-50", "SlimSAM-50, uniform pruning of SAM-B (384 wide, MLP 1536)", slimsam_50_config,
              WeightSource(_HUB + "Zigeng/SlimSAM-uniform-50/resolve/main/model.safetensors",
                           "slimsam-50-uniform.safetensors", None),
              "Apache-2.0", origin="HF hub Zigeng/SlimSAM-uniform-50"),
    ModelSpec("slimsam-77", "SlimSAM-77, uniform pruning of SAM-B (168 wide, MLP 696)", slimsam_77_config,
              WeightSource(_HUB + "Zigeng/SlimSAM-uniform-77/resolve/main/model.safetensors",
                           "slimsam-77-uniform.safetensors", None),
              "Apache-2.0", origin="HF hub Zigeng/SlimSAM-uniform-77"),
    _global_slimsam(50),
    _global_slimsam(77),
    ModelSpec("lite-sam", "Lite-SAM: LiteViT-1x encoder + AutoPPN point proposals, 640 px", LiteSamConfig, None,
              "Apache-2.0",
              how_to_get="Lite-SAM has no public weights: train them with slimseg distill (see docs/lite-sam.md) "
              "and load the resulting file by its path (--model PATH; load_model(path) in Python)",
              origin="no public weights"),
)
_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def list_models() -> list[str]:
    """Names accepted by :func:`slimseg.load_model` and :func:`slimseg.build_model`."""
    return [spec.name for spec in _SPECS]


def names_hint(text: str) -> str:
    """"did you mean 'sam-b'? registered models: ..." for a name that is not registered."""
    close = difflib.get_close_matches(text.lower(), list_models(), n=2, cutoff=0.6)
    guess = f"did you mean {' or '.join(repr(name) for name in close)}? " if close else ""
    return f"{guess}registered models: {', '.join(list_models())}"


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise SlimsegError(f"unknown model {name!r}: {names_hint(name)}") from None


def is_model_name(text: str) -> bool:
    return text.lower() in _REGISTRY


def spec_config(spec: ModelSpec) -> SamConfig | LiteSamConfig:
    if spec.config is None:
        raise SlimsegError(f"{spec.name} has widths that vary per block and come from its file: {spec.how_to_get}")
    return spec.config()


def _architecture(config: SamConfig | LiteSamConfig, like: SamConfig | LiteSamConfig) -> object:
    """``config`` with what a checkpoint may legitimately state differently from the registry
    (normalisation, LayerNorm eps, mask threshold) taken from ``like``: what is left is the
    architecture."""
    if not (isinstance(config, SamConfig) and isinstance(like, SamConfig)):
        return config
    encoder = dataclasses.replace(config.image_encoder, norm_eps=like.image_encoder.norm_eps)
    return dataclasses.replace(config, image_encoder=encoder, pixel_mean=like.pixel_mean, pixel_std=like.pixel_std,
                               mask_threshold=like.mask_threshold)


def _summary(config: SamConfig | LiteSamConfig) -> str:
    if isinstance(config, SamConfig):
        return f"a SAM with a {config.image_encoder.embed_dim}-wide, {config.image_encoder.depth}-block image encoder"
    return "a Lite-SAM model"


def architecture_mismatch(spec: ModelSpec, config: SamConfig | LiteSamConfig) -> str | None:
    """What is wrong with ``config`` as the architecture of ``spec``'s weights, or None.

    A cached file is verified when it is downloaded, not on every load (hashing gigabytes each
    time); this catches a different model copied or left in its place, at the cost of a
    comparison of configs."""
    if spec.config is None:
        return None
    expected = spec.config()
    if _architecture(config, expected) == expected:
        return None
    found, wanted = _summary(config), _summary(expected)
    if found == wanted:
        found = f"{found} whose other layer sizes differ"
    return f"holds {found}, not {spec.name} ({wanted})"


def stale_cache_hint(spec: ModelSpec) -> str:
    """What to do when a registered model's cached file cannot be used."""
    return f"the file is slimseg's cached download of {spec.name}: delete it so that the next use downloads it again"


def cache_dir() -> Path:
    """``$SLIMSEG_HOME``, else ``$XDG_CACHE_HOME/slimseg``, else ``~/.cache/slimseg``."""
    if os.environ.get("SLIMSEG_HOME"):
        return Path(os.environ["SLIMSEG_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "slimseg"
    return Path.home() / ".cache" / "slimseg"


def cache_path(spec: ModelSpec) -> Path | None:
    return cache_dir() / spec.weights.filename if spec.weights else None


def is_cached(spec: ModelSpec) -> bool:
    path = cache_path(spec)
    return path is not None and path.is_file()
