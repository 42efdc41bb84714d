"""The native CPU kernel for relative-position attention (rel_pos_attention.cpp), built on
first use with the system C++ compiler and called through ctypes.

On a 2-core AVX2 machine it runs global attention blocks 1.45x (SAM-B) to 2.4x (SlimSAM-77)
faster than torch's fused attention over a prebuilt bias, and 14x14 windows 1.1x to 2x
(docs/benchmarks.md); windowed blocks call it on the unpadded token grid
(:meth:`RelPosAttentionKernel.windows`). It needs an x86-64 CPU with AVX2 and FMA, a C++
compiler (``$CXX``, else ``c++``) and float32 inputs; without them, or with ``SLIMSEG_NATIVE_KERNELS=0``,
:func:`native_kernel` returns None and the callers keep torch's attention. Like the other
fast paths it serves only inference (``plain_compute()`` and autograd take torch's path).
The shared library is cached under ``<slimseg cache>/kernels``, named after a hash of the
source and the build command, so that an upgrade rebuilds it and concurrent first runs do
not clash.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from slimseg.modeling.sam.fast_paths import switched_off

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rel_pos_attention.cpp")
# included by SOURCE, and part of the cache key with it
HEADERS = (SOURCE.with_name("rel_pos_attention_simd.h"), SOURCE.with_name("rel_pos_attention_terms.h"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-fno-math-errno", "-shared", "-fPIC")
KERNEL_VERSION = 7
DISABLE_VARIABLE = "SLIMSEG_NATIVE_KERNELS"
BUILD_TIMEOUT_S = 300
KERNEL_DTYPE = torch.float32
# the dtypes whose attention the kernel computes: lower precisions are widened to float32 for it
KERNEL_INPUT_DTYPES = (KERNEL_DTYPE, torch.bfloat16, torch.float16)


class RelPosAttentionKernel:
    """One built and loaded kernel library: :meth:`__call__` runs global attention and
    :meth:`windows` windowed attention on torch tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._function = library.slimseg_rel_pos_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = (
            [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 7 + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_int64] * 4
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key = (0, 0)  # (threads, process id) the pool was made for

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """softmax(scale·q·kᵀ + rel_h[i, row(j)] + rel_w[i, col(j)])·v over an H x W token grid,
        with rel_h[i, r] = q_i·table_h[row(i), r] and rel_w[i, c] = q_i·table_w[col(i), c].

        Arguments:
            q, k: (B, heads, H*W, C) float32; any strides with unit-stride channels, such as
                the heads of a projection's output.
            v: (B, heads, H*W, Cv) float32, the same.
            table_h, table_w: (H, H, C) and (W, W, C), as ``relative_position_table`` gathers them.
        Returns:
            (B, heads, H*W, Cv), a view of (B, H*W, heads, Cv) storage.
        """
        _check_inputs(q, k, v)
        batch, heads, tokens, dim = q.shape
        height, width = table_h.shape[0], table_w.shape[0]
        _check_tables(table_h, table_w, (height, width), dim, tokens)
        out = q.new_empty(batch, tokens, heads, v.shape[-1]).transpose(1, 2)
        # (batch, head, grid row, grid column) strides, the token axis laid out as a grid
        strides = [(*t.stride()[:2], width * t.stride(2), t.stride(2)) for t in (q, k, v, out)]
        self._run((q, k, v, out), strides, heads, table_h, table_w, (height, width), (height, width), scale)
        return out

    def windows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
        scale: float, k_pad: torch.Tensor, v_pad: torch.Tensor,
    ) -> torch.Tensor:
        """The attention of :meth:`__call__` within each window of an H x W token grid, the
        windows as SAM's window partition makes them: h x w (the tables' sizes), from the top
        left, zero-padding the grid's right and bottom edges up to whole windows.

        Arguments:
            q, k: (B, H, W, heads, C) float32 with unit-stride channels, the projections of the
                unpadded grid.
            v: (B, H, W, heads, Cv) float32, the same.
            table_h, table_w: (h, h, C) and (w, w, C).
            k_pad, v_pad: (heads, C) and (heads, Cv): the key and value of a padding token
                (the projections' biases of its zeros).
        Returns:
            (B, H, W, heads, Cv), the result of every grid token; padding tokens' are not computed.
        """
        if any(t.dim() != 5 for t in (q, k, v)):
            raise ValueError(f"q, k and v must be (B, H, W, heads, C) grids, not {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        batch, height, width, heads, dim = q.shape
        _check_inputs(*(t.permute(0, 3, 1, 2, 4).flatten(2, 3) for t in (q, k, v)))
        window = (table_h.shape[0], table_w.shape[0])
        _check_tables(table_h, table_w, window, dim, window[0] * window[1])
        if k_pad.device.type != "cpu" or v_pad.device.type != "cpu":
            raise ValueError("the attention kernel takes float32 CPU tensors")
        if k_pad.shape != (heads, dim) or v_pad.shape != (heads, v.shape[-1]):
            raise ValueError(f"padding keys {tuple(k_pad.shape)} and values {tuple(v_pad.shape)} do not fit "
                             f"{heads} heads of {dim} and {v.shape[-1]} channels")
        k_pad, v_pad = (t.to(KERNEL_DTYPE).contiguous() for t in (k_pad, v_pad))
        out = q.new_empty(batch, height, width, heads, v.shape[-1])
        strides = [(t.stride(0), t.stride(3), t.stride(1), t.stride(2)) for t in (q, k, v, out)]
        self._run((q, k, v, out), strides, heads, table_h, table_w, window, (height, width), scale, (k_pad, v_pad))
        return out

    def _run(
        self, tensors: tuple[torch.Tensor, ...], strides: list[tuple[int, ...]], heads: int, table_h: torch.Tensor,
        table_w: torch.Tensor, window: tuple[int, int], grid: tuple[int, int], scale: float,
        pads: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Runs the library over every (batch, window, head) item, split among torch's threads.
        ``tensors``: q, k, v and out; ``strides``: their (batch, head, grid row, grid column)
        strides; ``pads``: the padding key and value, needed only where windows overhang the grid."""
        q, _, v, out = tensors
        # (query position, channel, key position): the kernel's terms run along key positions
        table_h, table_w = (F.pad(t.transpose(1, 2), (0, -t.shape[1] % 8)).contiguous() for t in (table_h, table_w))
        packed_strides = (ctypes.c_int64 * 16)(*(s for t_strides in strides for s in t_strides))
        pointers = [t.data_ptr() for t in (*tensors[:3], table_h, table_w, out)]
        pointers += [t.data_ptr() for t in pads] if pads is not None else [None, None]
        shape = (heads, *window, q.shape[-1], v.shape[-1], *grid)

        def run(task: tuple[int, int, int, int]) -> int:
            return self._function(*pointers, *shape, packed_strides, scale, *task)

        windows = -(-grid[0] // window[0]) * -(-grid[1] // window[1])
        tasks = _split(out.shape[0] * windows * heads, window[0] * window[1], torch.get_num_threads())
        statuses = list(self._executor().map(run, tasks)) if len(tasks) > 1 else [run(tasks[0])]
        if any(statuses):
            raise MemoryError("the attention kernel could not allocate its scratch memory")

    def _executor(self) -> ThreadPoolExecutor:
        # A forked child inherits the pool without its threads, so it makes its own.
        key = (torch.get_num_threads(), os.getpid())
        if self._pool is None or self._pool_key != key:
            if self._pool is not None and self._pool_key[1] == key[1]:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(key[0], thread_name_prefix="slimseg-attention")
            self._pool_key = key
        return self._pool


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernel reads raw memory: shapes that disagree would read past the tensors."""
    if any(t.device.type != "cpu" or t.dtype != KERNEL_DTYPE for t in (q, k, v)):
        raise ValueError("the attention kernel takes float32 CPU tensors")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k (B, heads, tokens, C) and v (B, heads, tokens, Cv) disagree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("the attention kernel needs unit-stride channels in q, k and v")


def _check_tables(table_h: torch.Tensor, table_w: torch.Tensor, window: tuple[int, int], dim: int,
                  tokens: int) -> None:
    rows, columns = window
    if any(t.device.type != "cpu" or t.dtype != KERNEL_DTYPE for t in (table_h, table_w)):
        raise ValueError("the attention kernel takes float32 CPU tensors")
    if table_h.shape != (rows, rows, dim) or table_w.shape != (columns, columns, dim) or rows * columns != tokens:
        raise ValueError(f"tables {tuple(table_h.shape)} and {tuple(table_w.shape)} do not fit "
                         f"{tokens} tokens of {dim} channels")


def _split(items: int, rows: int, threads: int) -> list[tuple[int, int, int, int]]:
    """(item_begin, item_end, row_begin, row_end) tasks: whole items when there are many
    (windows), else row ranges of each item (global blocks), a few tasks per thread so that
    threads finishing early take more."""
    target = max(1, threads * 4)
    if threads <= 1:
        return [(0, items, 0, rows)]
    if items >= target:
        step = -(-items // target)
        return [(first, min(first + step, items), 0, rows) for first in range(0, items, step)]
    per_item = -(-target // items)
    step = max(4, -(-rows // per_item))
    return [(item, item + 1, first, min(first + step, rows)) for item in range(items) for first in range(0, rows, step)]


_state: dict[str, object] = {"enabled": True}
_lock = threading.Lock()


def native_kernel() -> RelPosAttentionKernel | None:
    """The process's kernel, built and loaded on the first call; None where it cannot run
    (:func:`native_kernel_status` says why) or inside :func:`native_kernels_disabled`.
    Thread-safe; builds at most once per process."""
    with _lock:
        if "kernel" not in _state:
            compiler = os.environ.get("CXX", "c++")
            _state["kernel"], _state["status"] = load_native_kernel(compiler, _cache_dir())
            logger.info("attention kernel: %s", _state["status"])
    return _state["kernel"] if _state["enabled"] else None  # type: ignore[return-value]


def native_kernel_status(dtype: torch.dtype = KERNEL_DTYPE) -> str:
    """One line for benchmarks running at ``dtype``: ``native (AVX2, <library>)`` (with
    ``, in float32`` for bfloat16 and float16) or ``torch (<reason>)``."""
    if dtype not in KERNEL_INPUT_DTYPES:
        return f"torch (the native kernel takes float32, bfloat16 or float16, not {dtype})".replace("torch.", "")
    native_kernel()
    if not _state["enabled"]:
        return "torch (native kernels disabled)"
    status = str(_state["status"])
    if dtype == KERNEL_DTYPE or not status.startswith("native"):
        return status
    return f"{status.removesuffix(')')}, in float32)"


def native_kernels_disabled() -> contextlib.AbstractContextManager[None]:
    """Run the enclosed model calls on torch's attention (process-wide, not thread-local):
    for comparisons, and for tests of the torch paths."""
    return switched_off(_state)


def load_native_kernel(compiler: str, directory: Path) -> tuple[RelPosAttentionKernel | None, str]:
    """Build (or find) the library in ``directory`` with ``compiler`` and load it; returns the
    kernel, or None, with the status line. Never raises: any failure means torch's attention."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None, f"torch ({DISABLE_VARIABLE}=0)"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, "torch (the CPU lacks AVX2)"
    try:
        path = build_library(compiler, directory)
        kernel = RelPosAttentionKernel(_open(path))
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        return None, f"torch (no native kernel: {str(error).splitlines()[0]})"
    return kernel, f"native (AVX2, {path})"


def _open(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    if library.slimseg_kernel_version() != KERNEL_VERSION:
        raise RuntimeError(f"{path} is not version {KERNEL_VERSION} of the kernel")
    return library


def _cache_dir() -> Path:
    from slimseg.zoo.registry import cache_dir  # the zoo imports the model code

    return cache_dir() / "kernels"


def build_library(compiler: str, directory: Path) -> Path:
    """Compile SOURCE into ``directory`` unless a library of the same source and command is
    there; returns its path. Raises RuntimeError with the compiler's first error line."""
    executable = shutil.which(compiler)
    if executable is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    source = b"".join(path.read_bytes() for path in (SOURCE, *HEADERS))
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = directory / f"rel_pos_attention-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a private name and renamed into place, so that a process that finds the
    # library never sees it half-written, and two first runs at once each finish their own.
    handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run(
            [executable, *FLAGS, "-o", partial, str(SOURCE)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
        )
        if result.returncode != 0:
            message = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise RuntimeError(f"{compiler} failed: {message or 'exit status ' + str(result.returncode)}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
