"""The numerical references (segment-anything, transformers) built with known weights, and
the images they are compared on; shared by the tests and benchmarks/compare_references.py."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

_STUBS = Path(__file__).parent / "reference_stubs"


def import_segment_anything() -> ModuleType:
    """``import segment_anything``, with tests/reference_stubs' torchvision stand-in where
    torchvision is not installed.

    segment-anything binds the stand-in's functions at import; the stand-in is then hidden
    again so that transformers does not mistake it for the real torchvision.
    """
    if "segment_anything" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("segment_anything")
    sys.path.insert(0, str(_STUBS))
    try:
        return importlib.import_module("segment_anything")
    finally:
        sys.path.remove(str(_STUBS))
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


import_segment_anything()

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from slimseg.modeling.sam import SamConfig  # noqa: E402


def reference_sam(config: SamConfig) -> Sam:
    """segment-anything's Sam with the architecture of a uniform (unpruned-shape) config."""
    encoder = config.image_encoder
    block = encoder.blocks[0]
    windows = {b.window_size for b in encoder.blocks if not b.is_global}
    grid = encoder.grid_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=encoder.img_size,
            patch_size=encoder.patch_size,
            embed_dim=encoder.embed_dim,
            depth=encoder.depth,
            num_heads=block.num_heads,
            mlp_ratio=block.mlp_dim / encoder.embed_dim,
            out_chans=encoder.out_chans,
            qkv_bias=encoder.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=windows.pop() if windows else 0,
            global_attn_indexes=encoder.global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(encoder.img_size, encoder.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    ).eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every tensor (zero-initialised position tables included) random values, so that
    every weight influences the outputs; returns the state dict."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        scale = 1.0 if "gaussian_matrix" in key else 0.02 if tensor.dim() > 1 else 0.1
        base = 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm4.weight")) else 0.0
        state[key] = base + scale * noise
    model.load_state_dict(state)
    return state


def transformers_slimsam_77():
    """A random-init transformers ``SamModel`` with SlimSAM-77-uniform's config (hidden size
    168, MLP 696); its position tables, which start at zero, get random values too so that
    they influence the outputs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SamConfig(vision_config={"hidden_size": 168, "mlp_dim": 696})
    model = transformers.SamModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def real_photo() -> np.ndarray:
    """A real photograph (Grace Hopper, 512x600, shipped with matplotlib) as HxWx3 uint8 RGB."""
    from importlib.resources import files

    from slimseg.data.images import read_image

    return read_image(files("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg")
