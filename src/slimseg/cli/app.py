"""The ``slimseg`` Typer application: global options and the subcommand table."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Optional

import torch
import typer
from typer.core import TyperArgument, TyperOption
from typer.exceptions import TyperException

from slimseg import __version__
from slimseg.allocator import tune_cpu_allocator
from slimseg.cli.bench import bench
from slimseg.cli.common import State, error_line, user_errors
from slimseg.cli.compress import distill, prune
from slimseg.cli.export import export
from slimseg.cli.eval_coco import eval_coco
from slimseg.cli.models import convert, info, models
from slimseg.cli.segevery import segevery
from slimseg.cli.segment import segment
from slimseg.cli.train import train

def _hide_needless_placeholders() -> None:
    """Recent typer (0.2x) writes a type such as ``<bool>`` or ``<list[str]>`` beside every
    parameter in the help: flags take no value (``--json true`` is an error), and arguments
    are named by their metavar already. The classes are typer's, so another Typer app in the
    same process loses these placeholders too; typer offers no per-app setting."""
    for cls, hidden in ((TyperOption, lambda param: param.is_flag), (TyperArgument, lambda param: True)):
        display = getattr(cls, "display_type_rich", None)
        if display is None or getattr(display, "hides_placeholders", False):
            continue

        def display_type_rich(self, ctx: typer.Context, display=display, hidden=hidden) -> str | None:
            return None if hidden(self) else display(self, ctx)

        display_type_rich.hides_placeholders = True  # type: ignore[attr-defined]
        cls.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_needless_placeholders()


def _guarded(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` inside ``user_errors`` as a whole: a command imports its heavy modules before
    its own ``with user_errors()``, and a Ctrl-C there would otherwise end the run silently
    (typer >= 0.2x) or as an "Aborted!" (older)."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        with user_errors():
            command(*args, **kwargs)

    return run

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


app.command(no_args_is_help=True)(_guarded(segment))
app.command(no_args_is_help=True)(_guarded(segevery))
app.command(no_args_is_help=True)(_guarded(prune))
app.command(no_args_is_help=True)(_guarded(distill))
app.command(no_args_is_help=True)(_guarded(train))
app.command()(_guarded(models))
app.command(no_args_is_help=True)(_guarded(info))
app.command(no_args_is_help=True)(_guarded(convert))
app.command(no_args_is_help=True)(_guarded(export))
app.command("eval-coco", no_args_is_help=True)(_guarded(eval_coco))
app.command(no_args_is_help=True)(_guarded(bench))


def main() -> None:
    """The ``slimseg`` command. A malformed command line (unknown option, missing or
    out-of-range value) is one error line and exit status 2, like every other error,
    instead of the framework's usage box."""
    try:
        status = app(prog_name="slimseg", standalone_mode=False)
    except TyperException as error:
        # a command given without arguments has printed its help already (typer tells the
        # case apart by this class name too, without importing it)
        if type(error).__name__ != "NoArgsIsHelpError":
            context = getattr(error, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            # one line: some messages list their choices one per line
            error_line(f"{' '.join(error.format_message().split())}{hint}")
        sys.exit(error.exit_code)
    except typer.Abort:
        error_line("aborted")
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
