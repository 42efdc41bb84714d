"""``DistillConfig`` (the hyper-parameters of a distillation run) and ``DistillResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimseg.validation import as_integer, as_real
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
        """Refuse what would fail or mislead only later: counts must be integers (1.5 epochs
        would run 2), floats finite (an infinite lr gives NaN weights)."""
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            as_integer(getattr(self, name), f"distill: {name}", 1)
        as_integer(self.seed, "distill: seed")
        as_integer(self.num_workers, "distill: num_workers", 0)
        if self.intermediate_epochs is not None:
            as_integer(self.intermediate_epochs, "distill: intermediate_epochs", 0)
        if self.val_limit is not None:
            as_integer(self.val_limit, "distill: val_limit", 1)
        if not as_real(self.lr, "distill: lr") > 0:
            raise SlimsegError(f"distill: lr must be positive, got {self.lr}")
        as_real(self.intermediate_weight, "distill: intermediate_weight", 0, 1)
        if not isinstance(self.amp, bool):
            raise SlimsegError(f"distill: amp must be True or False, got {self.amp!r}")
        if self.align not in ALIGN_CHOICES:
            raise SlimsegError(f"distill: align must be one of {', '.join(ALIGN_CHOICES)}, got {self.align!r}")


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
