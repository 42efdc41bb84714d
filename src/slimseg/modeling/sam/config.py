"""One dataclass family that describes a SAM-style model exactly, pruned widths included.

The config is the single source of truth for an architecture: it is written beside the
weights (safetensors metadata or JSON) and rebuilds the module before the weights load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

from slimseg.errors import SlimsegError

if TYPE_CHECKING:  # modeling.autoppn imports modeling.sam, so the class is imported where used
    from slimseg.modeling.autoppn import AutoPPNConfig

GLOBAL_ATTENTION = 0  # window_size value for a block that attends over the whole image

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class BlockConfig:
    """Widths of one transformer block of the image encoder.

    ``qk_dim`` and ``v_dim`` are the total output widths of the query/key and value
    projections over all heads; each must be a multiple of ``num_heads``. SlimSAM's
    bottleneck pruning shrinks them (and ``mlp_dim``) block by block.
    """

    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    window_size: int = GLOBAL_ATTENTION

    @property
    def is_global(self) -> bool:
        return self.window_size == GLOBAL_ATTENTION

    def validate(self, index: int) -> None:
        where = f"image encoder block {index}"
        for name in ("num_heads", "qk_dim", "v_dim", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise SlimsegError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.window_size < 0:
            raise SlimsegError(f"{where}: window_size must be >= 0, got {self.window_size}")
        for name in ("qk_dim", "v_dim"):
            if getattr(self, name) % self.num_heads:
                raise SlimsegError(
                    f"{where}: {name}={getattr(self, name)} is not a multiple of num_heads={self.num_heads}"
                )


@dataclass(frozen=True)
class ImageEncoderConfig:
    """ViT image encoder. ``embed_dim`` is the residual-stream width, which every block shares
    (the residual additions tie it together); all other widths are per block."""

    embed_dim: int
    blocks: tuple[BlockConfig, ...]
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    norm_eps: float = 1e-6

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid_size(self) -> int:
        """Side of the token grid (64 for SAM at 1024 px)."""
        return self.img_size // self.patch_size

    @property
    def global_attn_indexes(self) -> tuple[int, ...]:
        return tuple(i for i, block in enumerate(self.blocks) if block.is_global)

    def validate(self) -> None:
        if self.embed_dim <= 0 or not self.blocks:
            raise SlimsegError("image encoder needs embed_dim > 0 and at least one block")
        if self.img_size % self.patch_size:
            raise SlimsegError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for index, block in enumerate(self.blocks):
            block.validate(index)


@dataclass(frozen=True)
class PromptEncoderConfig:
    embed_dim: int = 256
    mask_in_chans: int = 16


@dataclass(frozen=True)
class MaskDecoderConfig:
    transformer_dim: int = 256
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM-family model: image encoder, prompt encoder, mask decoder, normalisation,
    and optionally an AutoPPN point proposer over the image embedding (SAM + AutoPPN)."""

    image_encoder: ImageEncoderConfig
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    mask_threshold: float = 0.0
    autoppn: AutoPPNConfig | None = None

    def validate(self) -> "SamConfig":
        self.image_encoder.validate()
        if self.autoppn is not None:
            self.autoppn.validate()
            if self.autoppn.in_chans != self.image_encoder.out_chans:
                raise SlimsegError(f"AutoPPN in_chans {self.autoppn.in_chans} must equal the image encoder "
                                   f"out_chans {self.image_encoder.out_chans}")
        if self.image_encoder.out_chans != self.prompt_encoder.embed_dim:
            raise SlimsegError(
                f"image encoder out_chans {self.image_encoder.out_chans} must equal the prompt "
                f"embedding dim {self.prompt_encoder.embed_dim}"
            )
        if self.prompt_encoder.embed_dim != self.mask_decoder.transformer_dim:
            raise SlimsegError("prompt encoder embed_dim must equal mask decoder transformer_dim")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.autoppn is None:  # configs without AutoPPN serialise as they always have
            del data["autoppn"]
        return {"family": "sam", **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamConfig":
        try:
            data = dict(data)
            family = data.pop("family", "sam")
            if family != "sam":
                raise SlimsegError(f"config describes a {family!r} model, not a SAM-family model")
            encoder = dict(data.pop("image_encoder"))
            blocks = tuple(BlockConfig(**block) for block in encoder.pop("blocks"))
            autoppn = data.pop("autoppn", None)
            if autoppn is not None:
                from slimseg.modeling.autoppn import AutoPPNConfig

                autoppn = AutoPPNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in autoppn.items()})
            return cls(
                autoppn=autoppn,
                image_encoder=ImageEncoderConfig(blocks=blocks, **encoder),
                prompt_encoder=PromptEncoderConfig(**data.pop("prompt_encoder", {})),
                mask_decoder=MaskDecoderConfig(**data.pop("mask_decoder", {})),
                **{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()},
            ).validate()
        except (KeyError, TypeError, ValueError) as error:
            raise SlimsegError(f"invalid model config: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SlimsegError(f"invalid model config JSON: {error}") from None
        return cls.from_dict(data)

    def replace_encoder(self, **changes: Any) -> "SamConfig":
        return replace(self, image_encoder=replace(self.image_encoder, **changes))


def sam_vit_config(
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    mlp_dim: int | Sequence[int] | None = None,
    attn_dim: int | Sequence[int] | None = None,
    window_size: int = 14,
    img_size: int = 1024,
    patch_size: int = 16,
    out_chans: int = 256,
) -> SamConfig:
    """A SAM config with a plain ViT image encoder.

    ``mlp_dim`` and ``attn_dim`` (the q/k/v width) default to ``4 * embed_dim`` and
    ``embed_dim`` as in SAM; a sequence gives one value per block (pruned models).
    """

    def per_block(value: int | Sequence[int] | None, default: int, name: str) -> list[int]:
        if value is None:
            return [default] * depth
        if isinstance(value, int):
            return [value] * depth
        values = list(value)
        if len(values) != depth:
            raise SlimsegError(f"{name} has {len(values)} entries for {depth} blocks")
        return values

    mlp_dims = per_block(mlp_dim, 4 * embed_dim, "mlp_dim")
    attn_dims = per_block(attn_dim, embed_dim, "attn_dim")
    blocks = tuple(
        BlockConfig(
            num_heads=num_heads,
            qk_dim=attn_dims[i],
            v_dim=attn_dims[i],
            mlp_dim=mlp_dims[i],
            window_size=GLOBAL_ATTENTION if i in global_attn_indexes else window_size,
        )
        for i in range(depth)
    )
    encoder = ImageEncoderConfig(
        embed_dim=embed_dim, blocks=blocks, img_size=img_size, patch_size=patch_size, out_chans=out_chans
    )
    return SamConfig(image_encoder=encoder).validate()


def sam_b_config() -> SamConfig:
    return sam_vit_config(768, 12, 12, (2, 5, 8, 11))


def sam_l_config() -> SamConfig:
    return sam_vit_config(1024, 24, 16, (5, 11, 17, 23))


def sam_h_config() -> SamConfig:
    return sam_vit_config(1280, 32, 16, (7, 15, 23, 31))
