"""torch.distributed helpers: start from torchrun's environment, reduce scalars, flags."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from slimseg.errors import SlimsegError

__all__ = [
    "all_true",
    "broadcast_float",
    "init_distributed_from_env",
    "process_group",
    "is_distributed",
    "mean_across_ranks",
    "rank_and_world",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> tuple[int, int]:
    """Join the process group described by torchrun's variables (``WORLD_SIZE`` > 1).

    Uses NCCL when CUDA is available (and selects the ``LOCAL_RANK`` GPU) and gloo
    otherwise, with ``env://`` rendezvous. Without those variables, or with a group already
    initialised, nothing is started. Returns (rank, world size).
    """
    if is_distributed():
        return rank_and_world()
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SlimsegError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if world_size <= 1:
        return 0, 1
    if not dist.is_available():
        raise SlimsegError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise SlimsegError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start with torchrun")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return rank_and_world()


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``init_distributed_from_env`` for the duration of a run: yields (rank, world size) and
    destroys the group on exit if it was started here (a caller's own group is left alone)."""
    was_distributed = is_distributed()
    rank, world = init_distributed_from_env()
    owns_group = not was_distributed and is_distributed()
    try:
        yield rank, world
    finally:
        if owns_group and is_distributed():
            dist.destroy_process_group()


def _scalar_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo wants CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over all ranks (identity when not distributed)."""
    if not is_distributed() or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_scalar_device())
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank; every rank must call it at the same point."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_scalar_device())
    dist.all_reduce(tensor)
    return int(tensor.item()) == 0


def broadcast_float(value: float | None, source: int = 0) -> float | None:
    """Rank ``source``'s value on every rank (NaN stands for None on the wire)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float("nan") if value is None else value], dtype=torch.float64,
                          device=_scalar_device())
    dist.broadcast(tensor, src=source)
    result = float(tensor.item())
    return None if result != result else result
