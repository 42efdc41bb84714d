"""The floor: the time a model's arithmetic would take at the device's dense matmul rate.

``floor seconds = 2 * MACs / (FLOP/s of a large square matmul, same device and dtype)``.
No real network runs faster than a dense matmul of the same arithmetic, so measured time /
floor says how much of the time is spent on anything but arithmetic (memory traffic, small
kernels, Python): a fraction of the floor near 1 leaves little to gain.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimseg.benchmark.timing import check_runs, time_runs
from slimseg.inference.precision import dtype_name
from slimseg.zoo.families import ModelConfig
from slimseg.zoo.info import model_macs

# Matmuls grow from the first size, doubling, until one takes the target time: large enough
# to run at the device's full rate, small enough that slow paths (bfloat16 on CPUs without
# bf16 instructions runs at ~1 GFLOP/s) still take under a second.
_FIRST_SIZE = 256
_TARGET_SECONDS = {"cuda": 0.01, "other": 0.1}
_MAX_SIZE = {"cuda": 16384, "other": 4096}


@dataclass(frozen=True)
class MatmulRate:
    """The dense matmul rate measured on ``device`` at ``dtype``."""

    flops_per_second: float
    size: int
    device: str
    dtype: str


@dataclass(frozen=True)
class ModelWork:
    """Multiply-accumulates of one image encoder pass and of one batch of ``prompts`` point
    prompts through the prompt encoder and mask decoder."""

    encoder_macs: int
    decoder_macs: int
    prompts: int


def matmul_rate(device: torch.device, dtype: torch.dtype, runs: int = 3, max_size: int | None = None) -> MatmulRate:
    """FLOP/s (2 * n^3 per n x n matmul) of the median of ``runs`` square matmuls at the
    first size n (from 256, doubling, at most ``max_size``) whose single run takes the target
    time (10 ms on CUDA, 100 ms elsewhere)."""
    kind = "cuda" if device.type == "cuda" else "other"
    limit = _MAX_SIZE[kind] if max_size is None else max_size
    check_runs(runs, warmup=0)

    def product(size: int) -> Callable[[], torch.Tensor]:
        # filled on the device itself: 16384^2 random numbers made on the CPU take seconds
        left, right = (torch.empty(size, size, device=device, dtype=dtype).uniform_(-1, 1) for _ in "lr")
        return lambda: torch.matmul(left, right)

    size = min(_FIRST_SIZE, limit)
    with torch.inference_mode():
        work = product(size)
        work()  # BLAS thread pool and allocator start-up, not matmul speed
        while True:
            seconds = time_runs(work, device, runs=1, warmup=0).seconds
            if seconds[0] >= _TARGET_SECONDS[kind] or size * 2 > limit:
                break
            size *= 2
            work = product(size)
        if runs > 1:  # the run that chose the size counts as the first
            seconds += time_runs(work, device, runs=runs - 1, warmup=0).seconds
    return MatmulRate(2 * size**3 / statistics.median(seconds), size, str(device), dtype_name(dtype))


def model_work(config: ModelConfig, prompts: int) -> ModelWork:
    """MACs of the model of ``config`` (counted on the meta device, nothing computed)."""
    encoder, decoder = model_macs(config, prompts)
    return ModelWork(encoder_macs=encoder.total, decoder_macs=decoder.total, prompts=prompts)


def floor_seconds(macs: int, rate: MatmulRate) -> float:
    return 2 * macs / rate.flops_per_second
