"""``DistillConfig`` (the hyper-parameters of a distillation run) and ``DistillResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimseg.compress.losses import ALIGN_CHOICES
from slimseg.errors import SlimsegError

__all__ = ["DistillConfig", "DistillResult"]


@dataclass
class DistillConfig:
    """Hyper-parameters of one distillation run (defaults: SlimSAM step 1 on one GPU).

    ``batch_size`` is per process; the effective batch is batch_size × grad_accum × world size.
    ``intermediate_epochs`` (default: the first half of ``epochs``) is how many epochs use
    the intermediate terms with weight ``intermediate_weight``.
    ``amp`` autocasts to bfloat16 on the CPU and to float16 (with a GradScaler) on CUDA.
    """

    epochs: int = 20
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 1e-4
    amp: bool = False
    intermediate_weight: float = 0.5
    align: str = "auto"  # which intermediate features: "auto", "bottleneck" or "embedding" (losses.py)
    intermediate_epochs: int | None = None
    seed: int = 0
    num_workers: int = 0
    val_limit: int | None = None
    log_every: int = 10

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise SlimsegError(f"distill: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SlimsegError(f"distill: lr must be positive, got {self.lr}")
        if not 0.0 <= self.intermediate_weight <= 1.0:
            raise SlimsegError(f"distill: intermediate_weight must be in 0..1, got {self.intermediate_weight}")
        if self.intermediate_epochs is not None and self.intermediate_epochs < 0:
            raise SlimsegError(f"distill: intermediate_epochs must be >= 0, got {self.intermediate_epochs}")
        if self.align not in ALIGN_CHOICES:
            raise SlimsegError(f"distill: align must be one of {', '.join(ALIGN_CHOICES)}, got {self.align!r}")
        if self.num_workers < 0:
            raise SlimsegError(f"distill: num_workers must be >= 0, got {self.num_workers}")
        if self.val_limit is not None and self.val_limit < 1:
            raise SlimsegError(f"distill: val_limit must be >= 1, got {self.val_limit}")


@dataclass
class DistillResult:
    """What a run produced. ``epochs`` holds the epoch records of metrics.jsonl, resumed ones included;
    ``metric`` is "val_miou" (higher is better) or "train_loss" (lower is better)."""

    out_dir: Path
    epochs: list[dict[str, Any]]
    metric: str
    best_metric: float | None
    best_epoch: int | None
    intermediate_terms: list[str] = field(default_factory=list)
    intermediate_epochs: int = 0

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.safetensors"

    @property
    def final_path(self) -> Path:
        return self.out_dir / "final.safetensors"
