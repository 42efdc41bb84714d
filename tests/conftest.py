"""Shared fixtures: the segment-anything reference, tiny model configs, test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loopback import server  # noqa: F401  (fixture shared by the download tests)
from reference import import_segment_anything

from slimseg.modeling.sam import SamConfig, sam_vit_config

# before any test imports transformers: see import_segment_anything
import_segment_anything()


def tiny_config(**overrides) -> SamConfig:
    """A 4-block SAM at 256 px (16x16 tokens, window 8, blocks 1 and 3 global)."""
    arguments = dict(embed_dim=48, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=8,
                     img_size=256, mlp_dim=96)
    arguments.update(overrides)
    return sam_vit_config(**arguments)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


def random_tiny_model(seed: int, **overrides):
    """``tiny_config(**overrides)`` with random weights (norms left at identity), so outputs vary."""
    import slimseg

    # seeded construction too: buffers such as the prompt encoder's random Fourier features come
    # from the global generator, which module-scoped fixtures find in whatever state earlier tests left
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = slimseg.build_model(tiny_config(**overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def photo(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A photo-like HxWx3 uint8 image: smooth gradients, shapes and noise, so masks vary."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(20, 120)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] = rng.integers(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# The tiny model and its ONNX export that tests/test_export*.py share (the export takes seconds).
@pytest.fixture(scope="session")
def tiny():
    return random_tiny_model(3)


@pytest.fixture(scope="session")
def model_path(tiny, tmp_path_factory):
    import slimseg

    return slimseg.save_model(tiny, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """(folder, manifest) of the tiny model exported with int8 and float16 variants."""
    from slimseg.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("export") / "tiny-onnx"
    return folder, export_onnx(tiny, folder, quantize="int8", fp16=True, source="tiny")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Six small SA-1B-format images with masks (the distillation and pruning tests' data)."""
    from slimseg.data.synthetic import write_sa1b_folder

    root = tmp_path_factory.mktemp("sa1b")
    write_sa1b_folder(root, 6, size=(96, 128), seed=0)
    return root
