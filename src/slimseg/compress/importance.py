"""Channel-importance criteria for pruning, and SlimSAM's disturbed-Taylor gradient pass.

Taylor importance scores a channel by ``sum |w * g|`` over its weights, with ``g`` the
gradient of a loss. SlimSAM's loss is the label-free distillation objective it trains with
afterwards: the MSE between the student's image embedding and the teacher's. Right before
the first pruning the student *is* the teacher, so that loss and its gradient are exactly
zero; adding a little Gaussian noise to the target ("disturbed" Taylor) turns the gradient
into a random projection of the embedding's Jacobian, which is informative again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from slimseg.errors import SlimsegError
from slimseg.validation import as_real

IMPORTANCE_CHOICES = ("disturbed-taylor", "taylor", "magnitude", "random")
GRADIENT_IMPORTANCES = ("disturbed-taylor", "taylor")


class SeededRandomImportance(tp.importance.RandomImportance):
    """tp's uniform random scores, drawn from ``generator`` instead of the global RNG (which
    anything else may have advanced), so that a seed fixes the pruned model."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @torch.no_grad()
    def __call__(self, group: tp.Group, **kwargs: object) -> torch.Tensor:
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self.generator)


def make_importance(name: str, normalizer: str = "mean",
                    generator: torch.Generator | None = None) -> tp.importance.Importance:
    """The torch-pruning importance object for one of :data:`IMPORTANCE_CHOICES`.

    * ``"disturbed-taylor"``: group Taylor importance (mean over the coupled layers) of the
      gradients from :func:`accumulate_disturbed_gradients` (SlimSAM's default, sigma 0.01);
    * ``"taylor"``: the same criterion on gradients of the plain distillation loss
      (``sigma=0``). It only makes sense for a student that already differs from its teacher
      (e.g. before the second stage): on an unpruned student every gradient is exactly zero
      and :func:`~slimseg.compress.prune.prune_image_encoder` refuses to rank with it;
    * ``"magnitude"``: group L2 norm of the weights (label- and data-free);
    * ``"random"``: uniform random scores (the baseline), from ``generator`` (a CPU
      generator; default the global RNG).

    ``normalizer`` rescales each group's scores before ranking ("mean" as SlimSAM's first
    stage; "gaussian" z-scores them, which SlimSAM uses for global ranking across blocks).
    """
    if name in GRADIENT_IMPORTANCES:
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=normalizer)
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=normalizer)
    if name == "random":
        return SeededRandomImportance(generator)
    raise SlimsegError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCE_CHOICES)}")


def uses_gradients(importance: tp.importance.Importance) -> bool:
    """Whether ``importance`` reads the ``.grad`` of the weights it scores."""
    return isinstance(importance, tp.importance.GroupTaylorImportance)


def accumulate_disturbed_gradients(
    student_encoder: nn.Module,
    teacher_encoder: nn.Module,
    images: Iterable[torch.Tensor],
    sigma: float = 0.01,
    generator: torch.Generator | None = None,
) -> int:
    """Sum over ``images`` of the gradient of MSE(student(x), teacher(x) + noise).

    Arguments:
        student_encoder: the encoder to be pruned; its ``.grad`` are zeroed first and then
            hold the sum of the per-image gradients (what Taylor importance reads).
        teacher_encoder: the reference; may be the very same module as the student.
        images: batches of (B, 3, S, S) preprocessed images (normalised and padded).
        sigma: standard deviation of the noise added to the teacher's (B, C, h, w)
            embedding; 0 gives the plain distillation gradient.
        generator: source of the noise (on the embedding's device), for reproducibility.
    Returns:
        the number of images seen.
    """
    # NaN would slip past "sigma < 0" and fill every gradient with NaN, which Taylor ranks silently.
    as_real(sigma, "sigma", minimum=0)
    if sigma == 0 and _same_weights(student_encoder, teacher_encoder):
        # The exact gradient is zero; autograd would return float noise instead (the no-grad
        # teacher pass may take other attention kernels), which Taylor would rank as signal.
        raise SlimsegError(
            "the student equals its teacher, so the plain distillation gradient is zero; "
            "use sigma > 0 (disturbed Taylor)"
        )
    device = next(student_encoder.parameters()).device
    student_encoder.zero_grad(set_to_none=True)
    count = 0
    for batch in images:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise SlimsegError(f"expected (B, 3, S, S) image batches, got shape {tuple(batch.shape)}")
        batch = batch.to(device)
        # The target comes first and without a graph, so a teacher that is the student
        # itself contributes nothing to the gradient.
        with torch.no_grad():
            target = teacher_encoder(batch)
            if sigma > 0:
                noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
                target = target + sigma * noise
        embedding = student_encoder(batch)
        # Mean over each image's elements, summed over the batch: .grad ends up the sum of
        # per-image gradients (as SlimSAM's batch-1 loop) whatever the batching.
        loss = (embedding - target).pow(2).sum() / target[0].numel()
        loss.backward()
        count += batch.shape[0]
    if count == 0:
        raise SlimsegError("no images to collect gradients from")
    return count


def _same_weights(first: nn.Module, second: nn.Module) -> bool:
    if first is second:
        return True
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].device == b[k].device and torch.equal(a[k], b[k]) for k in a
    )


def check_gradients(module: nn.Module) -> None:
    """Raise unless the prunable layers of ``module`` carry usable (non-zero) gradients."""
    weights = [
        (name, layer.weight)
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and layer.weight is not None
    ]
    missing = [name for name, weight in weights if weight.grad is None]
    if missing:
        raise SlimsegError(
            f"Taylor importance needs gradients but {missing[0]} has none; "
            "run accumulate_disturbed_gradients() first"
        )
    if all(not bool(weight.grad.any()) for _, weight in weights):
        raise SlimsegError(
            "all gradients are zero (the student still equals its teacher), so Taylor importance "
            "cannot rank channels; use 'disturbed-taylor' (sigma > 0) or 'magnitude'"
        )
