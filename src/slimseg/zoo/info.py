"""What ``slimseg info`` and ``slimseg models`` report about a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimseg.errors import SlimsegError
from slimseg.modeling.complexity import MacCount, count_macs, count_parameters
from slimseg.modeling.sam import SamConfig
from slimseg.zoo.families import Model, ModelConfig, model_from_config
from slimseg.zoo.checkpoint import read_checkpoint, weights_file
from slimseg.zoo.download import file_sha256
from slimseg.zoo.registry import (
    ModelSpec,
    architecture_mismatch,
    cache_path,
    get_spec,
    is_cached,
    is_model_name,
    spec_config,
    stale_cache_hint,
)


def _meta_model(config: ModelConfig) -> Model:
    with torch.device("meta"):
        # no parameter needs a gradient: FlopCounterMode's module tracker would hook them
        return model_from_config(config).requires_grad_(False)


def model_macs(config: ModelConfig, prompts: int = 1) -> tuple[MacCount, MacCount]:
    """MACs of the image encoder on one (1, 3, S, S) image, and of the prompt encoder plus mask
    decoder on a batch of ``prompts`` single-point prompts with three output masks each,
    counted on meta-device modules (nothing is allocated or computed)."""
    model = _meta_model(config)
    size = model.img_size
    grid_h, grid_w = model.prompt_encoder.image_embedding_size
    with torch.device("meta"):
        image = torch.empty(1, 3, size, size)
        embedding = torch.empty(1, model.prompt_encoder.embed_dim, grid_h, grid_w)
        point, label = torch.empty(prompts, 1, 2), torch.ones(prompts, 1, dtype=torch.int)

    class _Decode(torch.nn.Module):
        def forward(self) -> None:
            sparse, dense = model.prompt_encoder((point, label), None, None)
            model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)

    return count_macs(model.image_encoder, image), count_macs(_Decode())


def complexity(config: ModelConfig) -> dict[str, Any]:
    """Parameters per part and MACs at the model's input size (encoder once, decoder per prompt)."""
    model = _meta_model(config)
    size = model.img_size
    encoder_macs, decoder_macs = model_macs(config)
    parts = {name: count_parameters(getattr(model, name))
             for name in ("image_encoder", "autoppn", "prompt_encoder", "mask_decoder")
             if getattr(model, name, None) is not None}
    return {
        "input_size": size,
        "parameters": {**parts, "total": count_parameters(model)},
        "macs": {
            "image_encoder": {"layers": encoder_macs.layers, "attention": encoder_macs.attention,
                              "total": encoder_macs.total},
            "decoder_per_prompt": decoder_macs.total,
        },
    }


def architecture(config: ModelConfig) -> dict[str, Any]:
    if not isinstance(config, SamConfig):
        return {"family": config.to_dict()["family"], "blocks": [], "config": config.to_dict()}
    encoder = config.image_encoder
    return {
        "family": "sam",
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "patch_size": encoder.patch_size,
        "global_attn_indexes": list(encoder.global_attn_indexes),
        "blocks": [
            {"heads": b.num_heads, "qk_dim": b.qk_dim, "v_dim": b.v_dim, "mlp_dim": b.mlp_dim,
             "window": b.window_size or "global"}
            for b in encoder.blocks
        ],
        "config": config.to_dict(),
    }


def describe(name_or_path: str | Path) -> dict[str, Any]:
    """Format, architecture with per-block widths, parameters, MACs and sha256 of a model.

    A registered name that is not cached is described from the registry without downloading.
    """
    text = str(name_or_path)
    if not text.strip():
        raise SlimsegError("empty model name or path: give a checkpoint path or a registered name")
    path = Path(text).expanduser()
    spec: ModelSpec | None = None
    if not path.exists() and is_model_name(text):
        spec = get_spec(text)
        path = cache_path(spec) if is_cached(spec) else None
    report: dict[str, Any] = {"model": text}
    if path is not None:
        checkpoint = read_checkpoint(path)
        if spec is not None and (problem := architecture_mismatch(spec, checkpoint.config)):
            raise SlimsegError(f"{path}: {problem}; {stale_cache_hint(spec)}")
        weights = weights_file(path)
        config = checkpoint.config
        report.update(path=str(path), format=checkpoint.format, sha256=file_sha256(weights))
    else:
        config = spec_config(spec)
        report.update(path=None, format="registry (weights not cached)",
                      sha256=spec.weights.sha256 if spec.weights else None)
    if spec is not None:
        report.update(source=spec.source, license=spec.license)
    report["architecture"] = architecture(config)
    report.update(complexity(config))
    return report


def registry_rows() -> list[dict[str, Any]]:
    """One row per registered model for ``slimseg models``."""
    from slimseg.zoo.registry import list_models

    rows = []
    for name in list_models():
        spec = get_spec(name)
        parameters = count_parameters(_meta_model(spec.config())) if spec.config else None
        rows.append({
            "name": name,
            "description": spec.description,
            "parameters": parameters,
            "input_size": _meta_model(spec.config()).img_size if spec.config else None,
            "source": spec.source,
            "origin": spec.origin,
            "sha256": spec.weights.sha256 if spec.weights else None,
            "license": spec.license,
            "cached": is_cached(spec),
            "cache_path": str(cache_path(spec)) if spec.weights else None,
        })
    return rows
