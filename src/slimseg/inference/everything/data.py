"""``MaskBatch``: the columns the mask generator carries per candidate mask, and the
stability score it filters on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from slimseg.errors import SlimsegError

__all__ = ["MaskBatch", "stability_score"]

Column = torch.Tensor | np.ndarray | list


class MaskBatch:
    """Named columns of equal length (tensors, arrays or lists): one row per mask.

    ``filter`` keeps rows by a boolean mask or by indices (in the indices' order);
    ``extend`` appends another batch's rows.
    """

    def __init__(self, **columns: Column) -> None:
        self._columns: dict[str, Column] = {}
        for name, column in columns.items():
            self[name] = column

    def __setitem__(self, name: str, column: Column) -> None:
        if not isinstance(column, (torch.Tensor, np.ndarray, list)):
            kind = type(column).__name__
            raise SlimsegError(f"MaskBatch column {name!r} must be a tensor, array or list, got {kind}")
        self._columns[name] = column

    def __getitem__(self, name: str) -> Column:
        return self._columns[name]

    def __delitem__(self, name: str) -> None:
        del self._columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()), []))

    def items(self) -> Iterator[tuple[str, Column]]:
        return iter(self._columns.items())

    def filter(self, keep: torch.Tensor | np.ndarray) -> None:
        """Keep the rows selected by ``keep``: (N,) bool, or (K,) integer indices."""
        keep_cpu = torch.as_tensor(keep).detach().cpu()
        if keep_cpu.dtype == torch.bool:
            indices = keep_cpu.nonzero().flatten()
        else:
            indices = keep_cpu.long()
        index_list = indices.tolist()
        for name, column in self._columns.items():
            if isinstance(column, torch.Tensor):
                self._columns[name] = column[indices.to(column.device)]
            elif isinstance(column, np.ndarray):
                self._columns[name] = column[indices.numpy()]
            else:
                self._columns[name] = [column[i] for i in index_list]

    def extend(self, other: MaskBatch) -> None:
        """Append ``other``'s rows; a column new to this batch is taken over as is."""
        for name, column in other.items():
            mine = self._columns.get(name)
            if mine is None:
                self._columns[name] = column
            elif isinstance(column, torch.Tensor):
                self._columns[name] = torch.cat([mine, column.to(mine.device)])
            elif isinstance(column, np.ndarray):
                self._columns[name] = np.concatenate([mine, column])
            else:
                self._columns[name] = mine + column

    def to_numpy(self) -> None:
        """Move every tensor column to the CPU as a numpy array."""
        for name, column in self._columns.items():
            if isinstance(column, torch.Tensor):
                self._columns[name] = column.detach().cpu().numpy()

    def summary(self) -> dict[str, Any]:
        """Column name → shape or length, for debugging."""
        return {name: tuple(c.shape) if hasattr(c, "shape") else len(c) for name, c in self._columns.items()}


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold ± offset``: (..., H, W) → (..., ) float32.

    The tighter mask lies inside the looser one, so the IoU is a ratio of pixel counts;
    the counts are exact integers, converted to float32 only for the division, which
    reproduces segment-anything bit for bit (0/0 gives NaN, as there).
    """

    def count(mask: torch.Tensor) -> torch.Tensor:
        # Summing rows in int16 first is several times faster than one int64 count on the
        # CPU and stays exact while a row (the width) has at most 32767 pixels.
        row_type = torch.int16 if mask.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
        return mask.sum(-1, dtype=row_type).sum(-1, dtype=torch.int32)

    inner = count(logits > (mask_threshold + offset))
    outer = count(logits > (mask_threshold - offset))
    return inner.float() / outer.float()
