"""One distillation epoch: forward both encoders, aligning loss, accumulated optimizer steps."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimseg.compress.distributed import all_true, is_distributed, mean_across_ranks
from slimseg.compress.losses import FeaturePair, FeatureTaps, intermediate_loss, mse
from slimseg.errors import SlimsegError

__all__ = ["EpochRunner", "EpochStats", "autocast_context"]


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU, float16 on CUDA, nothing elsewhere or when disabled."""
    if enabled and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class _Window:
    """Running sums of per-batch losses over a span of batches (a log window or an epoch)."""

    loss: float = 0.0
    embedding: float = 0.0
    intermediate: float = 0.0
    batches: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, embedding: float, intermediate: float, images: int) -> None:
        self.loss += loss
        self.embedding += embedding
        self.intermediate += intermediate
        self.batches += 1
        self.images += images

    def reduce(self) -> tuple[float, float, float, float]:
        """(loss, embedding, intermediate) means over all ranks' batches, and images on all ranks.

        Every rank must call this at the same point (it all-reduces when distributed).
        """
        totals = mean_across_ranks([self.loss, self.embedding, self.intermediate, float(self.batches),
                                    float(self.images)])
        batches = totals[3] if totals[3] > 0 else math.nan
        world = dist.get_world_size() if is_distributed() else 1
        return totals[0] / batches, totals[1] / batches, totals[2] / batches, totals[4] * world


@dataclass
class EpochStats:
    loss: float
    embedding_loss: float
    intermediate_loss: float | None
    images: int
    seconds: float


class EpochRunner:
    """Trains ``model`` (the student encoder, maybe DDP-wrapped) towards ``teacher``.

    Per batch: L = (1 - a)·MSE(E_s, E_t) + a·mean_k MSE(F_s^k, F_t^k) while the intermediate
    terms are on, else L = MSE(E_s, E_t); L / grad_accum is backpropagated and the optimizer
    steps every ``grad_accum`` batches (and once more at the end of the epoch for a short
    remainder, its gradient rescaled to a full window's size).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, amp: bool, grad_accum: int,
                 pairs: list[FeaturePair], student_taps: FeatureTaps | None,
                 teacher_taps: FeatureTaps | None) -> None:
        self.model, self.teacher, self.optimizer, self.scaler = model, teacher, optimizer, scaler
        self.device, self.amp, self.grad_accum = device, amp, grad_accum
        self.pairs, self.student_taps, self.teacher_taps = pairs, student_taps, teacher_taps

    def _set_taps(self, enabled: bool) -> None:
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.enabled = enabled
                taps.clear()

    def _optimizer_step(self, pending: int) -> None:
        if pending < self.grad_accum:
            # A short final window: scale its gradient up to the size of a full one.
            for parameter in self.model.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(self.grad_accum / pending)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync_gradients(self) -> None:
        """Average gradients over ranks by hand, for a remainder whose sync batch was skipped."""
        world = dist.get_world_size()
        for parameter in self.model.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world)

    def _batch_loss(self, images: torch.Tensor, weight: float | None) -> tuple[torch.Tensor, float, float]:
        with autocast_context(self.device, self.amp):
            with torch.no_grad():
                target = self.teacher(images)
            prediction = self.model(images)
        if prediction.shape != target.shape:
            raise SlimsegError(f"distill: student embedding {tuple(prediction.shape)} does not match the "
                               f"teacher's {tuple(target.shape)}")
        embedding = mse(prediction, target)
        if weight is None:
            return embedding, float(embedding.detach()), math.nan
        inter = intermediate_loss(self.student_taps, self.teacher_taps, self.pairs)
        loss = (1.0 - weight) * embedding + weight * inter
        return loss, float(embedding.detach()), float(inter.detach())

    def run(self, batches: Iterable[dict[str, Any] | None], total_batches: int, weight: float | None,
            step: int, log_every: int, on_log: Callable[[int, tuple[float, float, float, float], float], None],
            ) -> tuple[EpochStats, int]:
        """Train over ``batches`` (None entries are skipped); returns the stats and the new step.

        Args:
            weight: the intermediate weight a, or None when only the embedding is aligned.
            on_log: called on every rank with (step, reduced window means, images/s) every
                ``log_every`` optimizer steps and at the end of the epoch.
        """
        self.model.train()
        self._set_taps(weight is not None)
        self.optimizer.zero_grad(set_to_none=True)
        epoch, window = _Window(), _Window()
        pending = 0
        synced = True
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)

        def log(current_step: int) -> None:
            nonlocal window
            reduced = window.reduce()
            elapsed = max(time.perf_counter() - window.started, 1e-9)
            on_log(current_step, reduced, reduced[3] / elapsed)
            window = _Window()

        for index, batch in enumerate(batches):
            # Ranks must agree on skipping, or DDP's gradient all-reduce would wait forever.
            if not all_true(batch is not None):
                continue
            images = batch["image"].to(self.device, non_blocking=True)
            pending += 1
            synced = pending == self.grad_accum or index == total_batches - 1
            skip_sync = self.model.no_sync() if ddp and not synced else contextlib.nullcontext()
            with skip_sync:
                loss, embedding, inter = self._batch_loss(images, weight)
                self.scaler.scale(loss / self.grad_accum).backward()
            self._set_taps(weight is not None)
            for span in (epoch, window):
                span.add(float(loss.detach()), embedding, 0.0 if weight is None else inter, images.shape[0])
            if synced:
                self._optimizer_step(pending)
                pending, step = 0, step + 1
                if step % log_every == 0:
                    log(step)
        if pending:
            if ddp and not synced:
                self._sync_gradients()
            self._optimizer_step(pending)
            step += 1
        if window.batches:  # the same on every rank, since ranks skip batches together
            log(step)
        # Validation forwards must not fill the hooks with features nobody reads.
        self._set_taps(False)
        loss, embedding, inter, images = epoch.reduce()
        stats = EpochStats(loss, embedding, None if weight is None else inter, int(images),
                           time.perf_counter() - epoch.started)
        return stats, step
