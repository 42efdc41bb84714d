"""Running one command over many images: progress bar, a JSON line per image, per-image errors."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slimseg.cli.common import console, error_line
from slimseg.cli.inputs import ImageInput
from slimseg.errors import SlimsegError


def for_each_image(inputs: list[ImageInput], description: str, process: Callable[[ImageInput], dict]) -> None:
    """Call ``process`` per image and print its record (plus ``seconds``) as a JSON line.

    A failing image is reported on stderr in one line and the others still run; at the end
    the command exits with status 1 if any failed.
    """
    failures = 0
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=len(inputs))
        for image in inputs:
            started = time.perf_counter()
            try:
                record = process(image)
            except SlimsegError as error:
                message = str(error)
                error_line(message if str(image.path) in message else f"{image.path}: {message}")
                failures += 1
            except OSError as error:
                error_line(f"{image.path}: cannot write output ({error.strerror}: {error.filename})")
                failures += 1
            else:
                record["seconds"] = round(time.perf_counter() - started, 4)
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
            progress.advance(task)
    if failures:
        if len(inputs) > 1:
            error_line(f"{failures} of {len(inputs)} image(s) failed")
        raise typer.Exit(1)
