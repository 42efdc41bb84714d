"""Peak memory of one stage: CUDA's allocator peak, or the process's peak resident set on Linux."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# What ``PeakMemory.kind`` says the figure is.
CUDA_ALLOCATED = "cuda allocated"
STAGE_RSS = "process RSS"
PROCESS_RSS = "process peak RSS since start"


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Lower the kernel's resident-set high-water mark (VmHWM) to the current RSS, so that the
    next reading is the peak of what runs in between; False where this is not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _max_rss_since_start() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` and ``peak.kind``.

    On CUDA: the most memory the caching allocator handed out during the block on that
    device (``kind`` "cuda allocated"). Elsewhere: the process's peak resident set during the
    block ("process RSS", via /proc/self/clear_refs on Linux), or, where the peak cannot be
    reset, the peak since the process started ("process peak RSS since start"), which can
    only be an upper bound of the stage's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.kind = CUDA_ALLOCATED if device.type == "cuda" else STAGE_RSS

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self.kind = PROCESS_RSS
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        peak = _status_bytes("VmHWM") if self.kind == STAGE_RSS else None
        if peak is None:
            self.kind = PROCESS_RSS
            peak = _max_rss_since_start()
        self.bytes = peak
