"""One SlimSAM pruning stage of a SAM image encoder, in place, with torch-pruning 1.6.

Sub-structures (SAM-B numbers):

* embedding: the residual-stream width C (768): patch-embed out, ``pos_embed``, every
  LayerNorm, q/k/v/lin1 inputs, proj/lin2 outputs and the first neck conv's input;
* bottleneck: per block, the q/k/v width (12 heads x 64, the same intra-head offsets removed
  in every head) and the MLP hidden width (3072).

The neck's 256 output channels (the decoder's interface), the head count and the depth are
never touched. Kept widths are rounded down to multiples of ``round_to`` (the head count by
default), as SlimSAM does: ratio 0.77 gives 168 / 168 / 696 on SAM-B. ``Attention.scale``
follows the new head dim (SlimSAM's choice), so the logit temperature changes slightly and
distillation is expected to follow; relative-position tables keep their kept columns.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from slimseg.validation import as_integer, as_real
from slimseg.compress.importance import check_gradients, make_importance, uses_gradients
from slimseg.compress.prune_global import global_bottleneck_groups
from slimseg.compress.ratio_limits import check_ratio_reachable
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import Sam, SamConfig
from slimseg.modeling.sam.image_encoder import Attention, ImageEncoderViT

Stage = Literal["embedding", "bottleneck"]
Mode = Literal["local", "global"]
RelPos = tuple[nn.Parameter, nn.Parameter]


@dataclass(frozen=True)
class PruneReport:
    """What one pruning stage did. ``config`` describes the pruned model exactly (it is also
    assigned to ``model.config`` so that ``save_model`` writes the right architecture)."""

    stage: Stage
    mode: Mode
    ratio: float
    config: SamConfig
    params_before: int
    params_after: int
    rel_pos_reset_blocks: tuple[int, ...] = ()
    """Blocks whose relative-position tables were re-created as zeros (SlimSAM's behaviour)
    because their heads did not all keep the same offsets; the others were sliced exactly."""


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_image_encoder(
    model: Sam,
    ratio: float,
    stage: Stage,
    *,
    mode: Mode = "local",
    importance: tp.importance.Importance | str | None = None,
    round_to: int | None = None,
    example_input: torch.Tensor | None = None,
) -> PruneReport:
    """Prune ``model.image_encoder`` in place by one SlimSAM stage.

    Arguments:
        ratio: fraction of each sub-structure's channels to remove, in [0, 1); 0 is a no-op.
        stage: ``"embedding"`` or ``"bottleneck"`` (see the module docstring).
        mode: ``"local"`` removes the same fraction everywhere (SlimSAM's uniform models);
            ``"global"`` ranks all blocks' attention dims together and all MLP dims together,
            so widths differ per block (SlimSAM's second stage); every block keeps at least
            one q/k/v offset and ``round_to`` MLP channels, and a ratio those floors make
            unreachable is refused with the highest reachable one.
        importance: a torch-pruning importance, or the name of one (:func:`make_importance`);
            default magnitude. Taylor importances read the gradients accumulated *before* this call.
        round_to: kept embedding / MLP widths are multiples of it (default: the head count);
            q/k/v widths are always (kept offsets) x heads.
        example_input: (1, 3, S, S) tracing input at the encoder's full size (pos_embed fixes
            the token grid); default zeros in the encoder's dtype, on its device.
    """
    ratio, round_to = check_pruning(model, ratio, stage, mode, round_to)
    encoder = model.image_encoder
    params_before = count_parameters(encoder)
    if ratio == 0:
        return PruneReport(stage, mode, 0.0, model.config, params_before, params_before)
    if isinstance(importance, str):
        importance = make_importance(importance, normalizer="gaussian" if mode == "global" else "mean")
    importance = importance if importance is not None else make_importance("magnitude")
    if uses_gradients(importance):
        check_gradients(encoder)
    attentions = [block.attn for block in encoder.blocks]
    example_input = _tracing_input(encoder, example_input)

    # tp traces through autograd: a frozen encoder would give no graph and silently no groups.
    frozen = {name for name, param in encoder.named_parameters() if not param.requires_grad}
    encoder.requires_grad_(True)
    # torch-pruning 1.6.1 never finishes tracing through the relative-position einsums, so the
    # tables sit outside the model while the pruner exists.
    tables = _detach_rel_pos(attentions)
    removed: dict[int, list[int]] = {}
    try:
        _run_pruner(encoder, ratio, stage, mode, importance, round_to, example_input, removed)
    finally:
        gc.collect()  # the dependency graph is full of cycles; free it before anything else
        reset = _attach_rel_pos(attentions, tables, removed)
        for name, param in encoder.named_parameters():
            param.requires_grad_(name not in frozen)
    params_after = count_parameters(encoder)
    if params_after == params_before:
        raise SlimsegError(f"torch-pruning removed nothing from the {stage} at ratio {ratio}")
    config = _pruned_config(model)
    model.config = config
    return PruneReport(stage, mode, float(ratio), config, params_before, params_after, reset)


def default_round_to(encoder: ImageEncoderViT) -> int:
    """Channels kept in multiples of every block's head count, so the embedding width still
    splits into whole heads."""
    return math.lcm(*(block.attn.num_heads for block in encoder.blocks))


def check_pruning(model: Sam, ratio: Any, stage: str, mode: str, round_to: int | None = None) -> tuple[float, int]:
    """Everything ``prune_image_encoder`` would refuse that can be known without pruning:
    the arguments, the encoder type, and a ratio the widths cannot reach (which depends only
    on the sub-structure pruned, so it holds for every stage of alternate slimming too).
    Returns the ratio as a float and the effective ``round_to``."""
    ratio = as_real(ratio, "pruning ratio", 0, 1, maximum_open=True)
    if stage not in ("embedding", "bottleneck"):
        raise SlimsegError(f"unknown pruning stage {stage!r}; choose embedding or bottleneck")
    if mode not in ("local", "global"):
        raise SlimsegError(f"unknown pruning mode {mode!r}; choose local or global")
    if round_to is not None:
        as_integer(round_to, "round_to", 1)
    encoder = getattr(model, "image_encoder", None)
    if not isinstance(encoder, ImageEncoderViT):
        raise SlimsegError(f"can only prune slimseg's ImageEncoderViT, got {type(encoder).__name__}")
    round_to = round_to or default_round_to(encoder)
    if ratio == 0:
        return ratio, round_to
    # tp would silently skip a group the ratio empties; global blocks share a budget
    check_ratio_reachable(encoder, ratio, stage, mode, round_to)
    return ratio, round_to


def _tracing_input(encoder: ImageEncoderViT, example_input: torch.Tensor | None) -> torch.Tensor:
    """The (1, 3, S, S) input torch-pruning traces with, in the encoder's dtype and on its device
    (a float32 input would not pass a bfloat16 patch embedding)."""
    weight = encoder.patch_embed.proj.weight
    if weight.device.type == "meta":
        raise SlimsegError("the model is on the meta device (it has no weights); load or materialise it first")
    size = encoder.img_size
    if example_input is None:
        return torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
    if not isinstance(example_input, torch.Tensor) or tuple(example_input.shape) != (1, 3, size, size):
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise SlimsegError(f"example_input must be a (1, 3, {size}, {size}) tensor (the encoder's input size), "
                           f"got {shape}")
    return example_input.to(device=weight.device, dtype=weight.dtype)


def _run_pruner(
    encoder: ImageEncoderViT,
    ratio: float,
    stage: Stage,
    mode: Mode,
    importance: tp.importance.Importance,
    round_to: int,
    example_input: torch.Tensor,
    removed: dict[int, list[int]],
) -> None:
    """Build one pruner, prune, and record in ``removed`` the q channels taken per block."""
    blocks = list(encoder.blocks)
    # tp mutates the dicts it is given (channel groups, head counts): fresh ones every call.
    kwargs: dict[str, Any] = dict(
        global_pruning=mode == "global",
        pruning_ratio=ratio,
        in_channel_groups={},
        out_channel_groups={},
        unwrapped_parameters=_unwrapped_parameters(encoder),
    )
    if stage == "embedding":
        ignored: list[nn.Module] = [encoder.neck]
        for block in blocks:
            ignored += [block.attn.q, block.attn.k, block.attn.v, block.mlp.lin1]
        kwargs.update(ignored_layers=ignored, round_to=round_to, num_heads={})
    else:
        heads = {}
        for block in blocks:
            heads.update({block.attn.q: block.attn.num_heads, block.attn.k: block.attn.num_heads,
                          block.attn.v: block.attn.num_heads})
        # tp 1.6.1 applies round_to to the per-head count of an attention group but measures it
        # against the full width (48 -> 16 instead of 24 at ratio 0.5 with 4 heads), so rounding
        # is left to _round_kept for the MLP; attention widths are offsets x heads anyway.
        kwargs.update(
            ignored_layers=[encoder.patch_embed, encoder.neck],
            round_to=None,
            num_heads=heads,
            prune_head_dims=True,
            prune_num_heads=False,
        )
    q_layers = {block.attn.q: index for index, block in enumerate(blocks)}
    mlp_roots = {block.mlp.lin1 for block in blocks}
    with torch.enable_grad():  # tp traces with autograd
        pruner = tp.pruner.BasePruner(encoder, example_input, importance, **kwargs)
    try:
        if stage == "bottleneck" and mode == "global":
            groups = global_bottleneck_groups(pruner, blocks, ratio, round_to)
        else:
            groups = pruner.step(interactive=True)
        for group in groups:
            root = group[0].dep.target.module
            if mode == "local" and root in mlp_roots:
                group = _round_kept(pruner, group, round_to)
            for item in group:
                index = q_layers.get(item.dep.target.module)
                if index is not None and pruner.DG.is_out_channel_pruning_fn(item.dep.handler):
                    removed[index] = sorted(int(i) for i in item.idxs)
            group.prune()
    finally:
        del pruner


def _unwrapped_parameters(encoder: ImageEncoderViT) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside nn.Linear/Conv/LayerNorm with the dim that carries channels (given
    explicitly, which also silences tp's warning)."""
    params = [(encoder.neck[1].weight, 0), (encoder.neck[1].bias, 0), (encoder.neck[3].weight, 0),
              (encoder.neck[3].bias, 0)]
    if encoder.pos_embed is not None:
        params.append((encoder.pos_embed, 3))
    return params


def _round_kept(pruner: tp.pruner.BasePruner, group: tp.Group, round_to: int) -> tp.Group:
    """The MLP group with its kept width rounded down to a multiple of ``round_to`` (at least
    ``round_to``), taking the extra channels in ascending importance as tp's round_to does."""
    layer, handler = group[0].dep.target.module, group[0].dep.handler
    pruned = [int(i) for i in group[0].idxs]
    width = pruner.DG.get_out_channels(layer)
    kept = width - len(pruned)
    target = min(width, max(kept - kept % round_to, round_to))
    if target == kept:
        return group
    # The group has not been pruned yet, so its weights (and gradients) are the ones tp scored.
    order = torch.argsort(pruner.estimate_importance(pruner.DG.get_pruning_group(layer, handler, list(range(width)))))
    chosen = set(pruned)
    ranked = [int(i) for i in order if int(i) in chosen] + [int(i) for i in order if int(i) not in chosen]
    return pruner.DG.get_pruning_group(layer, handler, sorted(ranked[: width - target]))


def _detach_rel_pos(attentions: list[Attention]) -> list[RelPos | None]:
    tables: list[RelPos | None] = []
    for attn in attentions:
        if not attn.use_rel_pos:
            tables.append(None)
            continue
        tables.append((attn.rel_pos_h, attn.rel_pos_w))
        del attn.rel_pos_h, attn.rel_pos_w
        attn.use_rel_pos = False
    return tables


def _attach_rel_pos(attentions: list[Attention], tables: list[RelPos | None],
                    removed: dict[int, list[int]]) -> tuple[int, ...]:
    """Put the tables back, sliced to the kept q offsets; returns the blocks reset to zeros.

    The relative-position bias is a sum over the q head-dim channels, so dropping the table
    columns of the dropped channels keeps every remaining term exact, provided every head
    lost the same offsets (one table serves all heads).
    """
    reset: list[int] = []
    for index, (attn, pair) in enumerate(zip(attentions, tables)):
        if pair is None:
            continue
        head_dim = attn.q.out_features // attn.num_heads
        old_head_dim = pair[0].shape[1]
        keep = None
        if head_dim == old_head_dim:
            keep = list(range(head_dim))
        elif index in removed:
            keep = _kept_offsets(removed[index], old_head_dim, attn.num_heads)
        if keep is None or len(keep) != head_dim:
            keep = None
            reset.append(index)
        attn.rel_pos_h, attn.rel_pos_w = (_slice_table(table, keep, head_dim) for table in pair)
        attn.use_rel_pos = True
    return tuple(reset)


def _kept_offsets(removed: list[int], head_dim: int, num_heads: int) -> list[int] | None:
    """Offsets kept in every head when all heads lost the same ones, else None."""
    per_head = [sorted(i - h * head_dim for i in removed if h * head_dim <= i < (h + 1) * head_dim)
                for h in range(num_heads)]
    if any(offsets != per_head[0] for offsets in per_head):
        return None
    dropped = set(per_head[0])
    return [o for o in range(head_dim) if o not in dropped]


def _slice_table(table: nn.Parameter, keep: list[int] | None, head_dim: int) -> nn.Parameter:
    """(L, old_head_dim) → (L, head_dim): the kept columns, or zeros when unknown."""
    if keep is None:
        return nn.Parameter(table.new_zeros(table.shape[0], head_dim), requires_grad=table.requires_grad)
    index = torch.tensor(keep, device=table.device)
    sliced = nn.Parameter(table.data.index_select(1, index), requires_grad=table.requires_grad)
    if table.grad is not None:
        sliced.grad = table.grad.index_select(1, index)  # as tp keeps the pruned layers' grads
    return sliced


def _pruned_config(model: Sam) -> SamConfig:
    """The model's config with the widths read back from the pruned modules."""
    encoder = model.image_encoder
    old = model.config.image_encoder
    blocks = []
    for block_config, block in zip(old.blocks, encoder.blocks):
        attn = block.attn
        if attn.q.out_features % attn.num_heads or attn.v.out_features % attn.num_heads:
            raise SlimsegError(f"pruning left q/k/v widths that do not split into {attn.num_heads} heads")
        blocks.append(replace(block_config, qk_dim=attn.q.out_features, v_dim=attn.v.out_features,
                              mlp_dim=block.mlp.lin1.out_features))
    encoder_config = replace(old, embed_dim=encoder.patch_embed.proj.out_channels, blocks=tuple(blocks))
    return replace(model.config, image_encoder=encoder_config).validate()
