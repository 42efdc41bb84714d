"""What every subcommand shares: the stderr console, error reporting, option types."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.everything.options import number_problem

# Results go to stdout; messages and progress bars go to stderr, so pipes stay clean.
console = Console(stderr=True, highlight=False, soft_wrap=True)


class State:
    debug = False


def error_line(message: str) -> None:
    # the message is text, not markup: "slimseg[export]" or "[x, y]" must print as written;
    # a line break in it (a file name may hold one) is shown escaped, to keep it one line
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    console.print(f"[bold red]slimseg: error:[/] {escape(one_line)}", markup=True, highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler stopping a job), raised where the command is,
    so that it unwinds as on Ctrl-C: temporary files removed, nothing half-written."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn SlimsegError into one line on stderr and its exit status; other exceptions too,
    unless ``--debug`` asks for the traceback. Ctrl-C and SIGTERM unwind the command and
    end it with one line, exit status 130 or 143."""
    try:
        with _sigterm_unwinds():
            yield
    except Terminated:
        error_line("terminated")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except SlimsegError as error:
        if State.debug:
            raise
        error_line(str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        # stdout's reader has gone (`| head -1`): the framework ends the run quietly
        raise
    except Exception as error:  # a bug, but the user still gets one line
        if State.debug:
            raise
        error_line(f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


def check_output_path(path: Path, option: str = "--out", *, folder: bool, parent_must_exist: bool = False) -> None:
    """Refuse an output path that cannot be written, before any model is read or work done:
    a file where a folder is wanted (``folder=True``) or the reverse, a parent that is a file,
    or a folder that this user may not write into. Missing parent folders are fine (the
    writers create them) unless ``parent_must_exist``. Raises UsageError (exit status 2)."""
    if path.exists():
        if folder and not path.is_dir():
            raise UsageError(f"{option} {path} is a file: give a folder")
        if not folder and path.is_dir():
            raise UsageError(f"{option} {path} is a folder: give a file name")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: no permission to write in {existing}")
    if parent_must_exist and not path.parent.is_dir():
        raise UsageError(f"{option} {path}: folder {path.parent} does not exist")


DeviceOption = Annotated[
    str,
    typer.Option("--device", "-d", metavar="DEVICE", help="Where to run: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps (Apple GPUs).",
                 envvar="SLIMSEG_DEVICE", show_default=True),
]

_BATCH_HELP = "embedded together in one encoder pass. Larger batches fill a GPU; on a CPU 1 is fastest."

# segment embeds whole images; segevery embeds images, or with --crop-n-layers their crops
ImageBatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", min=1, metavar="N", help=f"Images {_BATCH_HELP}", show_default=True),
]

BatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", min=1, metavar="N", help=f"Images (with --crop-n-layers, their crops) {_BATCH_HELP}",
                 show_default=True),
]

DtypeOption = Annotated[
    str,
    typer.Option("--dtype", metavar="DTYPE", help="Precision of the model's forward passes: float32, bfloat16 or "
                 "float16 (autocast; outputs stay float32). Low precision pays on GPUs; on CPUs without "
                 "bfloat16 instructions it is slower.", show_default=True),
]

ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", metavar="NAME|PATH", help="Registered model name (see `slimseg models`) or a "
                 "checkpoint file or folder in any supported format (segment-anything .pth, SlimSAM .pth, "
                 "transformers SamModel, slimseg .safetensors).", show_default=True),
]

RecursiveOption = Annotated[bool, typer.Option("--recursive", "-r", help="Search folders recursively.")]

NullOption = Annotated[
    bool,
    typer.Option("--null", "-0", help="With -, the paths on stdin are separated by NUL characters (find -print0) and "
                 "taken exactly, so names may hold newlines or spaces at either end."),
]

OfflineOption = Annotated[
    bool,
    typer.Option("--offline", envvar="SLIMSEG_OFFLINE",
                 help="Never download: a registered model that is not cached is an error naming the file to fetch "
                 "and where to put it. Also set by SLIMSEG_OFFLINE=1."),
]


def check_generator_numbers(values: dict[str, float]) -> None:
    """The generator's ranges (see MaskGenerator), checked before the model loads; ``values``
    maps its argument names to their values, each reported under its option (--pred-iou-thresh
    for pred_iou_thresh). NaN is refused too."""
    for name, value in values.items():
        problem = number_problem(name, value)
        if problem is not None:
            raise UsageError(f"--{name.replace('_', '-')} {problem}, got {value}")


def model_input_files(model: str) -> list[Path]:
    """The files that loading ``--model`` reads, so that no output replaces them: a local
    checkpoint (a path wins over a registered name, as in ``load_model``) or a registered
    model's cached download."""
    from slimseg.zoo.checkpoint import checkpoint_files
    from slimseg.zoo.registry import cache_path, get_spec, is_model_name

    path = Path(model).expanduser()
    if model.strip() and path.exists():
        try:
            # the weights (or shard index and shards) and config.json, for a file or a folder;
            # other files in a folder, such as an earlier report, may be replaced
            return checkpoint_files(path)
        except SlimsegError:  # unreadable: loading it will say why
            return [path]
    if is_model_name(model):
        cached = cache_path(get_spec(model))
        return [cached] if cached is not None else []
    return []
