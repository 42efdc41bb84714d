"""``slimseg bench``: latency, throughput, peak memory and the matmul floor of one model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Column, Table

from slimseg.cli.common import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    OfflineOption,
    check_output_path,
    console,
    model_input_files,
    user_errors,
)
from slimseg.errors import UsageError
from slimseg.io import refuse_overwriting_inputs

_stdout = Console(soft_wrap=True, highlight=False)
# wide enough for any table of stages, so that measuring one gives its natural width
_MEASURE_WIDTH = 10_000


def _check_json_target(path: Path, model: str, image: Optional[Path]) -> None:
    """Fail before minutes of measuring, not after: the folder must exist already (a bad
    argument, exit status 2, like every other output path that cannot be written), and the
    report must not replace the checkpoint or the image that the run reads."""
    check_output_path(path, "--json", folder=False, parent_must_exist=True)
    refuse_overwriting_inputs(path, [*model_input_files(model), *([image] if image is not None else [])], "--json")


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str], None]]:
    """A line on stderr per stage, and on a terminal a spinner with the stage running."""
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(console.status("bench")) if console.is_terminal else None

        def show(description: str) -> None:
            console.print(f"bench: {description}", markup=False)
            if status is not None:
                status.update(f"bench: {description}")

        yield show


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def _bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _table(report: dict) -> Table:
    table = Table(Column("stage", no_wrap=True), "median", Column("throughput", no_wrap=True),
                  Column("floor", no_wrap=True), "of floor", "peak memory")
    for stage in report["stages"].values():
        fraction = stage["floor_fraction"]
        table.add_row(stage["label"], _seconds(stage["median_s"]), f"{stage['rate']:.3g} {stage['rate_unit']}",
                      _seconds(stage["floor_s"]), "-" if fraction is None else f"{100 * fraction:.1f} %",
                      _bytes(stage["peak_memory_bytes"]))
        for part, seconds in stage["parts_median_s"].items():
            table.add_row(f"  {part}", _seconds(seconds), "", "", "", "", style="dim")
    return table


def _print_table(table: Table) -> None:
    """On a terminal the table fits its width; into a file or a pipe rich would squeeze it
    into 80 columns (cut headers, wrapped values), so it is printed at its natural width."""
    if _stdout.is_terminal:
        _stdout.print(table)
        return
    width = Console(width=_MEASURE_WIDTH).measure(table).maximum
    Console(file=_stdout.file, width=width, soft_wrap=True, highlight=False).print(table)


def _print_report(report: dict) -> None:
    from slimseg.benchmark import machine_line

    model, matmul = report["model"], report["matmul"]
    kinds = sorted({stage["memory_kind"] for stage in report["stages"].values()})
    _stdout.print(f"model    {model['name']} ({model['family']}, {model['parameters'] / 1e6:.2f} M parameters, "
                  f"{model['img_size']} px{', random weights' if model['random_weights'] else ''})", markup=False)
    _stdout.print(f"machine  {machine_line(report['machine'])}", markup=False)
    _stdout.print(f"floor    2 x MACs / dense matmul rate {matmul['flops_per_second'] / 1e9:.3g} GFLOP/s "
                  f"({matmul['size']}x{matmul['size']}, {matmul['dtype']}); encoder "
                  f"{model['encoder_macs'] / 1e9:.3g} GMACs, decoder {model['decoder_macs'] / 1e9:.3g} GMACs "
                  f"per batch of {model['decoder_prompts']}", markup=False)
    _print_table(_table(report))
    _stdout.print(f"medians of {report['settings']['runs']} run(s) after {report['stages']['encoder']['warmup']} "
                  f"warm-up; peak memory: {', '.join(kinds)}", markup=False)


def bench(
    model: ModelOption = "sam-b",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per stage; the median is reported.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs before the timed ones (at least 1 with --compile).")] = 1,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Single-point prompts decoded together in the decoder-throughput stage.")] = 64,
    segevery: Annotated[bool, typer.Option("--segevery/--no-segevery", help="Also time SegEvery (grid, and AutoPPN when the model has it) per image.")] = True,
    points_per_side: Annotated[int, typer.Option("--points-per-side", min=1, help="SegEvery grid points per side (32 → 1024 prompts).")] = 32,
    image: Annotated[Optional[Path], typer.Option("--image", metavar="PATH", help="Image for the encoder, box prompt and SegEvery (default: a generated 768x1024 image with shapes).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Also time N images in one encoder pass (images per second), as `segment --batch-size N` runs them.")] = 1,
    compile_: Annotated[bool, typer.Option("--compile", help="Wrap the image encoder and mask decoder in torch.compile (compiled during warm-up).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (torch.set_num_threads); default: torch's.", show_default=False)] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build the registered model with random weights instead of loading (speed does not depend on weights).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="PATH", help="Also write the results as JSON to PATH (its folder must exist).", show_default=False)] = None,
    offline: OfflineOption = False,
) -> None:
    """Time one model: encoder, decoder, a box prompt and SegEvery, with peak memory and floor.

    The floor is the model's MACs at the device's dense matmul rate. A table goes to stdout,
    progress to stderr; --json writes the same figures.
    """
    from slimseg.benchmark import BenchSettings, run_bench
    from slimseg.benchmark.suite import DEFAULT_IMAGE_SIZE
    from slimseg.data.images import read_image
    from slimseg.devices import resolve_device
    from slimseg.io import atomic_write_text
    from slimseg.zoo import build_model, load_model
    from slimseg.zoo.registry import is_model_name

    with user_errors():
        settings = BenchSettings(runs=runs, warmup=warmup, prompts=prompts, segevery=segevery,
                                 points_per_side=points_per_side, dtype=dtype, compile=compile_,
                                 batch_size=batch_size)
        settings.check()
        if json_path is not None:
            _check_json_target(json_path, model, image)
        target = resolve_device(device)
        rgb = read_image(image) if image is not None else None
        if random_weights and not is_model_name(model):
            raise UsageError(f"--random-weights builds a registered model (see `slimseg models`); {model!r} is not one")
        if threads is not None:
            torch.set_num_threads(threads)
        network = build_model(model, device=target) if random_weights else load_model(model, device=target,
                                                                                      offline=offline)
        with _progress() as show:
            report = run_bench(network, settings, image=rgb, on_stage=show).to_dict()
        report["model"] = {"name": model, "random_weights": random_weights, **report["model"]}
        report["image"] = str(image) if image is not None else "generated {}x{}".format(*DEFAULT_IMAGE_SIZE)
        _print_report(report)
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
