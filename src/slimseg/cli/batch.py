"""Running one command over many images: progress bar, a JSON line per image, per-image errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slimseg.cli.common import console, error_line
from slimseg.cli.inputs import ImageInput
from slimseg.data.images import read_image
from slimseg.errors import DeviceOutOfMemory, SlimsegError
from slimseg.io import json_dumps_strict

Embedding = TypeVar("Embedding")


def for_each_image(inputs: list[ImageInput], description: str, process: Callable[[ImageInput], dict]) -> None:
    """Call ``process`` per image and print its record (plus ``seconds``) as a strict JSON line
    (a NaN or infinite number is written as null).

    A failing image is reported on stderr in one line and the others still run; at the end
    the command exits with status 1 if any failed. Running out of device memory stops the run.
    """
    failures = 0
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # rich would route sys.stdout through the bar's console, which is stderr: the records
    # must reach stdout (a pipe or file) even while a bar is drawn on the terminal
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal,
                  redirect_stdout=sys.stdout.isatty()) as progress:
        task = progress.add_task(description, total=len(inputs))
        for image in inputs:
            started = time.perf_counter()
            try:
                record = process(image)
            except DeviceOutOfMemory:
                raise
            except SlimsegError as error:
                message = str(error)
                error_line(message if str(image.path) in message else f"{image.path}: {message}")
                failures += 1
            except OSError as error:
                error_line(f"{image.path}: cannot write output ({error.strerror}: {error.filename})")
                failures += 1
            else:
                record["seconds"] = round(time.perf_counter() - started, 4)
                sys.stdout.write(json_dumps_strict(record) + "\n")
                sys.stdout.flush()
            progress.advance(task)
    if failures:
        if len(inputs) > 1:
            error_line(f"{failures} of {len(inputs)} image(s) failed")
        raise typer.Exit(1)


class EmbeddedImages(Generic[Embedding]):
    """Images read and embedded ``batch_size`` at a time, in the order ``for_each_image``
    visits them: ``take(image)`` gives the image's pixels and its entry of
    ``embed(pixels of its batch)``.

    A file that cannot be read fails alone: its error is raised when its turn comes, and
    the rest of its batch is embedded without it.
    """

    def __init__(self, inputs: Sequence[ImageInput], batch_size: int,
                 embed: Callable[[list[np.ndarray]], list[Embedding]]) -> None:
        self._inputs = inputs
        self._batch_size = batch_size
        self._embed = embed
        self._taken = 0
        self._ready: dict[int, tuple[np.ndarray, Embedding] | SlimsegError] = {}

    def take(self, image: ImageInput) -> tuple[np.ndarray, Embedding]:
        position = self._taken
        if position >= len(self._inputs) or self._inputs[position] is not image:
            raise ValueError("EmbeddedImages.take: images must be taken in input order")
        if position not in self._ready:
            self._prepare(position)
        self._taken += 1
        entry = self._ready.pop(position)
        if isinstance(entry, SlimsegError):
            raise entry
        return entry

    def _prepare(self, first: int) -> None:
        pixels: dict[int, np.ndarray] = {}
        for position in range(first, min(first + self._batch_size, len(self._inputs))):
            try:
                pixels[position] = read_image(self._inputs[position].path)
            except SlimsegError as error:
                self._ready[position] = error
        if not pixels:
            return
        try:
            embeddings = self._embed(list(pixels.values()))
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5 on
            hint = " (try a smaller --batch-size)" if len(pixels) > 1 else ""
            reason = (str(error).strip().splitlines() or ["out of memory"])[0]
            raise DeviceOutOfMemory(f"out of memory embedding {len(pixels)} image(s) at once{hint}: {reason}") from None
        for (position, rgb), embedding in zip(pixels.items(), embeddings):
            self._ready[position] = (rgb, embedding)
