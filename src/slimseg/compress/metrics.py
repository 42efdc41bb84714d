"""``metrics.jsonl``: one JSON object per logged optimizer step and one per finished epoch.

Step records: ``{"kind": "step", "epoch", "step", "loss", "embedding_loss",
"intermediate_loss", "lr", "images_per_s"}``; epoch records: ``{"kind": "epoch", "epoch",
"step", "train_loss", "embedding_loss", "intermediate_loss", "val_miou", "lr", "seconds",
"images"}``. ``intermediate_loss`` is null when the intermediate terms were off; ``val_miou``
is null without a validation set. ``slimseg train`` logs its own loss terms (``mask_loss``,
``iou_loss``, ``heatmap_loss``; per size group for AutoPPN) and, for AutoPPN, ``val_recall``
with ``val_random_recall`` (as many random points) and ``val_proposals`` (points per image)
instead of ``val_miou``. Epochs and steps count from 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slimseg.io import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged loss is logged as null rather than breaking parsers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl``; each line is flushed at once so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({key: _clean(value) for key, value in record.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch``: on resume, the interrupted epoch is redone
        and its partial step records would otherwise appear twice."""
        records = read_metrics(self.path)
        kept = [record for record in records if int(record.get("epoch", 0)) <= epoch]
        if len(kept) != len(records):
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All parseable records of a metrics file; a torn last line (killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
