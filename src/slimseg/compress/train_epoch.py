"""One training epoch over any objective: forward, loss, accumulated optimizer steps, DDP sync."""

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

    part_count: int
    loss: float = 0.0
    sums: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    batches: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, parts: tuple[float, ...], images: int) -> None:
        if not self.sums:
            self.sums, self.counts = [0.0] * self.part_count, [0.0] * self.part_count
        self.loss += loss
        for index, value in enumerate(parts):
            if not math.isnan(value):  # a term that is off in this batch
                self.sums[index] += value
                self.counts[index] += 1
        self.batches += 1
        self.images += images

    def reduce(self) -> tuple[float, tuple[float | None, ...], float]:
        """(mean loss, mean of each part or None where it was off throughout) over all ranks'
        batches, and the images of all ranks.

        Every rank must call this at the same point (it all-reduces when distributed).
        """
        zeros = [0.0] * self.part_count
        totals = mean_across_ranks([self.loss, float(self.batches), float(self.images),
                                    *(self.sums or zeros), *(self.counts or zeros)])
        loss, batches, images = totals[:3]
        sums, counts = totals[3:3 + self.part_count], totals[3 + self.part_count:]
        parts = tuple(total / count if count > 0 else None for total, count in zip(sums, counts))
        world = dist.get_world_size() if is_distributed() else 1
        return loss / batches if batches > 0 else math.nan, parts, images * world


@dataclass
class EpochStats:
    loss: float
    parts: dict[str, float | None]
    images: int
    seconds: float


class EpochRunner:
    """Trains the parameters of ``objective`` that require gradients (the objective may be
    wrapped in DistributedDataParallel).

    ``objective(batch, weight)`` returns (loss, part values named by ``part_names``); L /
    grad_accum is backpropagated and the optimizer steps every ``grad_accum`` batches (and
    once more at the end of the epoch for a short remainder, its gradient rescaled to a full
    window's size).
    """

    def __init__(self, objective: nn.Module, part_names: tuple[str, ...], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, amp: bool, grad_accum: int) -> None:
        self.objective, self.part_names, self.optimizer, self.scaler = objective, part_names, optimizer, scaler
        self.device, self.amp, self.grad_accum = device, amp, grad_accum

    def _trained(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.objective.parameters() if parameter.requires_grad]

    def _optimizer_step(self, pending: int) -> None:
        if pending < self.grad_accum:
            # A short final window: scale its gradient up to the size of a full one.
            for parameter in self._trained():
                if parameter.grad is not None:
                    parameter.grad.mul_(self.grad_accum / pending)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync_gradients(self) -> None:
        """Average gradients over ranks by hand, for a remainder whose sync batch was skipped."""
        world = dist.get_world_size()
        for parameter in self._trained():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                for key, value in batch.items()}

    def run(self, batches: Iterable[dict[str, Any] | None], total_batches: int, weight: float | None,
            step: int, log_every: int, on_log: Callable[[int, float, dict[str, float | None], float], None],
            ) -> tuple[EpochStats, int]:
        """Train over ``batches`` (None entries are skipped); returns the stats and the new step.

        Args:
            weight: passed to the objective (distillation: the intermediate weight, or None).
            on_log: called on every rank with (step, mean loss, mean parts, images/s) every
                ``log_every`` optimizer steps and at the end of the epoch.
        """
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        count = len(self.part_names)
        epoch, window = _Window(count), _Window(count)
        pending = 0
        synced = True
        ddp = isinstance(self.objective, nn.parallel.DistributedDataParallel)

        def log(current_step: int) -> None:
            nonlocal window
            loss, parts, images = window.reduce()
            elapsed = max(time.perf_counter() - window.started, 1e-9)
            on_log(current_step, loss, dict(zip(self.part_names, parts)), images / elapsed)
            window = _Window(count)

        for index, batch in enumerate(batches):
            # Ranks must agree on skipping, or DDP's gradient all-reduce would wait forever.
            if not all_true(batch is not None):
                continue
            batch = self._to_device(batch)
            pending += 1
            synced = pending == self.grad_accum or index == total_batches - 1
            skip_sync = self.objective.no_sync() if ddp and not synced else contextlib.nullcontext()
            with skip_sync:
                with autocast_context(self.device, self.amp):
                    loss, parts = self.objective(batch, weight)
                self.scaler.scale(loss / self.grad_accum).backward()
            for span in (epoch, window):
                span.add(float(loss.detach()), parts, batch["image"].shape[0])
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
        loss, parts, images = epoch.reduce()
        stats = EpochStats(loss, dict(zip(self.part_names, parts)), int(images), time.perf_counter() - epoch.started)
        return stats, step
