"""The ``slimseg`` Typer application: global options and the subcommand table."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer

from slimseg import __version__
from slimseg.allocator import tune_cpu_allocator
from slimseg.cli.bench import bench
from slimseg.cli.common import State
from slimseg.cli.compress import distill, prune
from slimseg.cli.export import export
from slimseg.cli.eval_coco import eval_coco
from slimseg.cli.models import convert, info, models
from slimseg.cli.segevery import segevery
from slimseg.cli.segment import segment
from slimseg.cli.train import train

app = typer.Typer(
    name="slimseg",
    help="Small and fast Segment Anything: prune, distill, segment, segment everything, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"slimseg {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_show_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, envvar="SLIMSEG_THREADS", metavar="N", show_default=False,
        help="CPU threads for torch (default: torch's, one per core). Over many images, N processes with "
             "--threads 1 each get more done than one process with N threads.")] = None,
) -> None:
    State.debug = debug
    if threads is not None:
        torch.set_num_threads(threads)
    tune_cpu_allocator()


app.command(no_args_is_help=True)(segment)
app.command(no_args_is_help=True)(segevery)
app.command(no_args_is_help=True)(prune)
app.command(no_args_is_help=True)(distill)
app.command(no_args_is_help=True)(train)
app.command()(models)
app.command(no_args_is_help=True)(info)
app.command(no_args_is_help=True)(convert)
app.command(no_args_is_help=True)(export)
app.command("eval-coco", no_args_is_help=True)(eval_coco)
app.command(no_args_is_help=True)(bench)


def main() -> None:
    app(prog_name="slimseg")
