"""The native relative-position attention kernel against float64 attention, its work split,
its build (cache, failures) and its place in the image encoder.

The kernel tests skip, with the reason, where it cannot be built (no AVX2, no C++ compiler);
the build-failure tests run everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tiny_model

import slimseg.modeling.sam.native_attention as native_attention
from slimseg.modeling.sam.fast_paths import plain_compute
from slimseg.modeling.sam.image_encoder import window_partition, window_unpartition
from slimseg.modeling.sam.native_attention import (
    build_library,
    load_native_kernel,
    native_kernel,
    native_kernel_status,
    native_kernels_disabled,
)
from slimseg.modeling.sam.rel_pos import (
    decomposed_rel_pos_bias,
    rel_pos_attention,
    rel_pos_terms,
    relative_position_table,
)


@pytest.fixture(scope="module")
def kernel():
    found = native_kernel()
    if found is None:
        pytest.skip(native_kernel_status())
    return found


def _problem(batch, heads, grid, dim, value_dim, seed, logit_scale=1.0):
    """q, k, v as views of one projection output (like the encoder's) over a ``grid`` of
    (rows, columns) tokens, or grid x grid for an int, and the two tables."""
    rows, columns = (grid, grid) if isinstance(grid, int) else grid
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(batch, rows * columns, heads, 2 * dim + value_dim, generator=generator)
    q, k, v = (t.transpose(1, 2) for t in projected.split([dim, dim, value_dim], dim=-1))
    tables = [torch.randn(2 * size - 1, dim, generator=generator) * logit_scale * 0.3 for size in (rows, columns)]
    return q * logit_scale, k, v, tables


def _gathered(tables, grid):
    """The relative-position embeddings of each query and key row, and of each column."""
    rows, columns = (grid, grid) if isinstance(grid, int) else grid
    return [relative_position_table(rows, rows, tables[0]), relative_position_table(columns, columns, tables[1])]


def _float64_attention(q, k, v, tables, grid, scale):
    size = (grid, grid) if isinstance(grid, int) else grid
    rel_h, rel_w = rel_pos_terms(q.double(), tables[0].double(), tables[1].double(), size)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    weights = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2) + bias, dim=-1)
    return weights @ v.double()


@pytest.mark.parametrize(
    "batch, heads, grid, dim, value_dim",
    [
        (1, 3, 32, 14, 14),  # a global block: keys grid width a multiple of 16, bias from its factors
        (5, 2, 7, 16, 19),  # windows: 49 keys padded to 64, odd value width
        (2, 2, 16, 32, 32),
        (1, 2, 9, 64, 64),
        (1, 2, (12, 32), 14, 14),  # rows and columns differ, bias from its factors
        (2, 1, (5, 11), 24, 24),  # rows and columns differ, 55 keys padded to 64
        (1, 1, 1, 8, 3),  # one token
    ],
)
def test_kernel_matches_float64_attention(kernel, batch, heads, grid, dim, value_dim):
    q, k, v, tables = _problem(batch, heads, grid, dim, value_dim, seed=dim + value_dim)
    gathered = _gathered(tables, grid)
    got = kernel(q, k, v, *gathered, dim**-0.5)
    want = _float64_attention(q, k, v, tables, grid, dim**-0.5)
    assert got.shape == (batch, heads, q.shape[2], value_dim) and got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) < 2e-6 * float(want.abs().max())
    assert got.transpose(1, 2).is_contiguous()  # the caller merges heads with a view


def test_kernel_refuses_inputs_that_disagree(kernel):
    q, k, v, tables = _problem(1, 2, 8, 14, 14, seed=1)
    table_h, table_w = _gathered(tables, 8)
    with pytest.raises(ValueError, match="do not fit 64 tokens"):
        kernel(q, k, v, table_h, table_w[:4, :4], 0.3)
    with pytest.raises(ValueError, match="disagree"):
        kernel(q, k[:, :, :32], v, table_h, table_w, 0.3)
    with pytest.raises(ValueError, match="float32 CPU"):
        kernel(q.double(), k.double(), v.double(), table_h.double(), table_w.double(), 0.3)
    with pytest.raises(ValueError, match="unit-stride channels"):
        kernel(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, table_h, table_w, 0.3)
    q, k, v, k_pad, v_pad, tables = _grid_problem(1, 2, (8, 8), 14, 6, seed=1)
    table_h, table_w = _gathered(tables, 4)
    with pytest.raises(ValueError, match="padding keys"):
        kernel.windows(q, k, v, table_h, table_w, 0.3, k_pad[:, :6], v_pad)
    with pytest.raises(ValueError, match="do not fit 16 tokens"):
        kernel.windows(q, k, v, table_h, table_w[..., :6], 0.3, k_pad, v_pad)
    with pytest.raises(ValueError, match="disagree"):
        kernel.windows(q, k[:, :4], v, table_h, table_w, 0.3, k_pad, v_pad)
    with pytest.raises(ValueError, match=r"\(B, H, W, heads, C\) grids"):
        kernel.windows(q.flatten(1, 2), k, v, table_h, table_w, 0.3, k_pad, v_pad)
    with pytest.raises(ValueError, match="float32 CPU"):
        kernel.windows(q, k, v, table_h.double(), table_w, 0.3, k_pad, v_pad)


def _grid_problem(batch, heads, grid, dim, value_dim, seed):
    """q, k, v as (B, H, W, heads, C) views of one projection of a token grid, the padding
    key and value per head, and the two relative-position tables."""
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(batch, *grid, heads, 2 * dim + value_dim, generator=generator)
    q, k, v = projected.split([dim, dim, value_dim], dim=-1)
    k_pad, v_pad = torch.randn(heads, dim, generator=generator), torch.randn(heads, value_dim, generator=generator)
    return q, k, v, k_pad, v_pad, [torch.randn(7, dim, generator=generator) * 0.3 for _ in range(2)]


@pytest.mark.parametrize("grid, window", [((9, 11), 4), ((8, 8), 4), ((3, 5), 7), ((16, 16), 16)],
                         ids=["padded-edges", "whole-windows", "one-padded-window", "one-global-window"])
def test_kernel_windows_match_partitioned_float64_attention(kernel, grid, window):
    """Windows read off the unpadded grid against SAM's way: pad the grid with the padding
    token (its key and value; its query is never used), partition, attend per window."""
    batch, heads, dim, value_dim = 2, 3, 14, 6
    q, k, v, k_pad, v_pad, tables = _grid_problem(batch, heads, grid, dim, value_dim, seed=sum(grid) + window)
    tables = [torch.randn(2 * window - 1, dim, generator=torch.Generator().manual_seed(window)) * 0.3] * 2
    got = kernel.windows(q, k, v, *_gathered(tables, window), dim**-0.5, k_pad, v_pad)
    assert got.shape == (batch, *grid, heads, value_dim) and got.is_contiguous()

    def windows_of(t, pad):
        padded_grid = [-(-size // window) * window for size in grid]
        full = pad.expand(batch, *padded_grid, *pad.shape).clone()
        full[:, : grid[0], : grid[1]] = t
        parts = full.unflatten(1, (-1, window)).unflatten(3, (-1, window)).permute(0, 1, 3, 5, 2, 4, 6)
        return parts.reshape(-1, heads, window * window, t.shape[-1])  # (B * windows, heads, tokens, C)

    want = _float64_attention(windows_of(q, torch.zeros(heads, dim)), windows_of(k, k_pad), windows_of(v, v_pad),
                              tables, window, dim**-0.5)
    rows, cols = (-(-size // window) for size in grid)
    want = want.reshape(batch, rows, cols, heads, window, window, value_dim).permute(0, 1, 4, 2, 5, 3, 6)
    want = want.reshape(batch, rows * window, cols * window, heads, value_dim)[:, : grid[0], : grid[1]]
    assert float((got.double() - want).abs().max()) < 2e-6 * float(want.abs().max())


def test_kernel_reads_any_layout_of_heads(kernel):
    """Heads as views of one projection (the encoder's case) or as separate contiguous
    tensors: the kernel packs keys and values itself, so the result is the same."""
    q, k, v, tables = _problem(2, 3, 8, 14, 11, seed=4)
    gathered = _gathered(tables, 8)
    views = kernel(q, k, v, *gathered, 0.3)
    copies = kernel(q.contiguous(), k.contiguous(), v.contiguous(), *gathered, 0.3)
    assert torch.equal(views, copies)


def test_kernel_keeps_precision_over_a_wide_logit_range(kernel):
    """Logits up to about ±90: the running maximum moves from key block to key block and
    most weights underflow. float32 logits that large carry rounding errors of their own, so
    the kernel is held to torch's fused attention on the same inputs."""
    grid = 32
    q, k, v, tables = _problem(1, 2, grid, 16, 16, seed=3, logit_scale=12.0)
    gathered = _gathered(tables, grid)
    got = kernel(q, k, v, *gathered, 0.25)
    want = _float64_attention(q, k, v, tables, grid, 0.25)
    bias = decomposed_rel_pos_bias(q, tables[0], tables[1], (grid, grid))
    torch_error = float((F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.25).double() - want).abs().max())
    assert float((got.double() - want).abs().max()) <= 1.5 * torch_error


def test_kernel_gives_the_same_bits_on_one_or_two_threads(kernel):
    q, k, v, tables = _problem(3, 2, 16, 14, 14, seed=5)
    gathered = _gathered(tables, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v, *gathered, 0.3)
        torch.set_num_threads(2)
        two = kernel(q, k, v, *gathered, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("items, rows, threads", [(1, 4096, 2), (12, 4096, 2), (300, 196, 2), (7, 5, 3), (2, 9, 1)])
def test_work_split_covers_every_row_once(items, rows, threads):
    covered = torch.zeros(items, rows, dtype=torch.int64)
    tasks = native_attention._split(items, rows, threads)
    for item_begin, item_end, row_begin, row_end in tasks:
        covered[item_begin:item_end, row_begin:row_end] += 1
    assert bool((covered == 1).all())
    assert threads == 1 or len(tasks) >= min(threads, items * rows)


@pytest.mark.parametrize("window", [8, 6], ids=["whole-windows", "padded-windows"])
def test_encoder_with_the_kernel_matches_the_plain_computation(kernel, window):
    """A tiny SAM (global and windowed blocks, its 16 x 16 grid in whole or padded windows)
    through the fast paths with the kernel, with torch's attention, and plain."""
    model = random_tiny_model(seed=4, window_size=window)
    image = torch.rand(1, 3, model.img_size, model.img_size) * 255
    with torch.inference_mode():
        native = model.image_encoder(model.preprocess(image))
        with native_kernels_disabled():
            torch_attention = model.image_encoder(model.preprocess(image))
        with plain_compute():
            plain = model.image_encoder(model.preprocess(image))
    scale = float(plain.abs().max())
    assert float((native - plain).abs().max()) < 1e-4 * scale
    assert float((torch_attention - plain).abs().max()) < 1e-4 * scale


def test_windowed_blocks_attend_on_the_grid_where_the_kernel_runs(kernel):
    """In float32 CPU inference a windowed block reads its windows off the unpadded grid,
    with the same result as partitioning; elsewhere it partitions as SAM does."""
    block = random_tiny_model(seed=5, window_size=6).image_encoder.blocks[0]
    x = torch.randn(2, 16, 16, block.attn.q.in_features)
    with torch.inference_mode():
        on_grid = block.attn.within_windows(x, 6)
        windows, padded = window_partition(x, 6)
        partitioned = window_unpartition(block.attn(windows), 6, padded, (16, 16))
        assert block.attn.within_windows(x.double(), 6) is None
        with native_kernels_disabled():
            assert block.attn.within_windows(x, 6) is None
        with plain_compute():
            assert block.attn.within_windows(x, 6) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # projections in bfloat16, attention in float32
            low_precision = block.attn.within_windows(x, 6)
        hook = block.attn.q.register_forward_hook(lambda module, inputs, output: None)
        assert block.attn.within_windows(x, 6) is None  # the hook sees the windows SAM makes
        hook.remove()
    assert block.attn.within_windows(x.requires_grad_(), 6) is None  # training keeps SAM's graph
    torch.testing.assert_close(on_grid, partitioned, rtol=1e-5, atol=1e-6)
    assert low_precision.dtype == torch.bfloat16
    assert float((low_precision.float() - partitioned).abs().max()) < 0.03 * float(partitioned.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attention_runs_the_kernel_in_float32(kernel, dtype):
    """bfloat16 and float16 q, k, v (--dtype on a CPU) are widened for the kernel: the result
    is the kernel's float32 attention of the same values, narrowed, in the kernel's layout."""
    q, k, v, tables = _problem(1, 3, 32, 14, 14, seed=9)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.inference_mode():
        got = rel_pos_attention(q, k, v, *tables, (32, 32), 14**-0.5)
        want = kernel(q.float(), k.float(), v.float(), *_gathered(tables, 32), 14**-0.5).to(dtype)
    assert got.dtype == dtype and got.transpose(1, 2).is_contiguous()
    assert torch.equal(got, want)


def _compiled_with_graph_ops(function, *inputs):
    """``function(*inputs)`` through torch.compile in one graph (an error on any graph break),
    run as captured without inductor; returns the result and the graph's call targets."""
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    out = torch.compile(function, backend=keep_graph, fullgraph=True)(*inputs)
    return out, {node.target for graph in graphs for node in graph.graph.nodes}


needs_custom_ops = pytest.mark.skipif(not hasattr(torch.library, "custom_op"),
                                      reason="torch.library.custom_op arrived in torch 2.4")


@needs_custom_ops
@pytest.mark.parametrize("native", [True, False], ids=["kernel", "torch-chunks"])
def test_compiled_attention_keeps_the_cpu_operator(kernel, native):
    """Compiled, the CPU path is one opaque operator with the eager path's result, instead of
    the whole bias (805 MB per global block of SAM-B; SlimSAM-77's compiled encoder was 3x
    slower than eager)."""
    q, k, v, tables = _problem(1, 3, 16, 14, 14, seed=7)
    switch = contextlib.nullcontext() if native else native_kernels_disabled()
    with torch.inference_mode(), switch:
        eager = rel_pos_attention(q, k, v, *tables, (16, 16), 0.3)
        compiled, targets = _compiled_with_graph_ops(
            lambda *tensors: rel_pos_attention(*tensors, (16, 16), 0.3), q, k, v, *tables)
    assert torch.ops.slimseg.rel_pos_attention.default in targets
    assert torch.equal(compiled, eager)
    assert compiled.stride() == eager.stride()


@needs_custom_ops
def test_the_cpu_operator_takes_channels_of_any_stride(kernel):
    q, k, v, tables = _problem(2, 2, 8, 8, 8, seed=8)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    assert strided[0].stride(-1) != 1
    with torch.inference_mode():
        expected = rel_pos_attention(q, k, v, *tables, (8, 8), 0.5)
        out = torch.ops.slimseg.rel_pos_attention(*strided, *tables, 8, 8, 0.5)
    assert torch.equal(out, expected)


def test_autograd_keeps_torch_attention(kernel):
    q = torch.randn(1, 2, 16 * 16, 8, requires_grad=True)
    table = torch.randn(31, 8, requires_grad=True)
    out = rel_pos_attention(q, q, q, table, table, (16, 16), 0.5)
    out.sum().backward()
    assert q.grad is not None and float(table.grad.abs().sum()) > 0


def test_built_library_is_reused_from_the_cache(tmp_path, kernel):
    first = build_library(os.environ.get("CXX", "c++"), tmp_path)
    modified = first.stat().st_mtime_ns
    assert build_library(os.environ.get("CXX", "c++"), tmp_path) == first
    assert first.stat().st_mtime_ns == modified
    assert [path.name for path in tmp_path.iterdir()] == [first.name]


@pytest.mark.parametrize("changed", range(len(native_attention.HEADERS)))
def test_a_changed_header_builds_a_new_library(tmp_path, kernel, monkeypatch, changed):
    """Each of the kernel's headers is part of the cache key: an upgrade that changes only
    that header must not load the library built from the old one."""
    first = build_library(os.environ.get("CXX", "c++"), tmp_path / "cache")
    sources = tmp_path / "sources"
    sources.mkdir()
    for path in (native_attention.SOURCE, *native_attention.HEADERS):
        (sources / path.name).write_bytes(path.read_bytes())
    headers = tuple(sources / path.name for path in native_attention.HEADERS)
    headers[changed].write_text(headers[changed].read_text() + "\n// a later version\n")
    monkeypatch.setattr(native_attention, "SOURCE", sources / native_attention.SOURCE.name)
    monkeypatch.setattr(native_attention, "HEADERS", headers)
    second = build_library(os.environ.get("CXX", "c++"), tmp_path / "cache")
    assert second != first and second.is_file()


def _failing_compiler(tmp_path: Path) -> Path:
    script = tmp_path / "broken-c++"
    script.write_text("#!/bin/sh\necho 'rel_pos_attention.cpp:1: error: no AVX2 here' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_failing_compiler_means_torch_attention_and_leaves_no_files(tmp_path):
    cache = tmp_path / "kernels"
    with pytest.raises(RuntimeError, match="error: no AVX2 here"):
        build_library(str(_failing_compiler(tmp_path)), cache)
    assert list(cache.iterdir()) == []
    kernel, status = load_native_kernel(str(_failing_compiler(tmp_path)), cache)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert kernel is None and status.startswith("torch (no native kernel:") and "no AVX2 here" in status


def test_a_missing_compiler_or_the_switch_means_torch_attention(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=re.escape("no C++ compiler 'no-such-c++' on PATH")):
        build_library("no-such-c++", tmp_path)
    monkeypatch.setenv("SLIMSEG_NATIVE_KERNELS", "0")
    assert load_native_kernel("c++", tmp_path) == (None, "torch (SLIMSEG_NATIVE_KERNELS=0)")


def test_disabled_kernels_report_torch():
    with native_kernels_disabled():
        assert native_kernel() is None
        assert native_kernel_status() == "torch (native kernels disabled)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_kernel_on_its_own_threads(kernel):
    """The parent's worker threads do not survive fork; the child must not wait on them."""
    import multiprocessing

    q, k, v, tables = _problem(1, 2, 16, 14, 14, seed=6)
    gathered = _gathered(tables, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = kernel(q, k, v, *gathered, 0.3)  # the parent's pool now exists
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_attend_in_child, (q, k, v, gathered)).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, want)


def _attend_in_child(q, k, v, gathered):
    torch.set_num_threads(2)
    return native_kernel()(q, k, v, *gathered, 0.3)  # the parent's, inherited


def test_two_first_runs_at_once_build_one_library(tmp_path, kernel):
    """Two processes (say `xargs -P 2`) finding no library both build it; each renames its
    own finished file into place, so both load it and no partial file is left."""
    import subprocess
    import sys

    program = (
        "import sys; from pathlib import Path; "
        "from slimseg.modeling.sam.native_attention import load_native_kernel; "
        "kernel, status = load_native_kernel(sys.argv[1], Path(sys.argv[2])); "
        "print(status); sys.exit(0 if kernel else 1)"
    )
    compiler = os.environ.get("CXX", "c++")
    runs = [subprocess.Popen([sys.executable, "-c", program, compiler, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all(line.startswith("native (AVX2") for line in outputs)
    assert len(list(tmp_path.iterdir())) == 1 and next(tmp_path.iterdir()).suffix == ".so"
