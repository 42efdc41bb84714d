"""Rich progress display of a training run on stderr (rank 0 only, terminals only)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["TrainingProgress"]


class TrainingProgress:
    """One bar per epoch: ``epoch e/E  [bar]  step s/S  loss  lr  img/s  elapsed  eta``.

    Disabled (every method a no-op) when ``enabled`` is false or the console is not a
    terminal, so that logs redirected to a file do not fill up with redraws.
    """

    def __init__(self, console: Console | None, enabled: bool = True) -> None:
        console = console if console is not None else Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not (enabled and console.is_terminal),
            transient=False,
        )
        self._task = None

    def __enter__(self) -> "TrainingProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, lr: float) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            "train", total=total_steps, epoch=f"{epoch}/{epochs}", loss="-", lr=f"{lr:.2e}", speed="-"
        )

    def update(self, completed: int, loss: float, lr: float, images_per_s: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=completed, loss=f"{loss:.4g}", lr=f"{lr:.2e}",
                                  speed=f"{images_per_s:.1f}")

    def log(self, message: str) -> None:
        """A line printed above the bars (or plainly when the bars are disabled)."""
        self._progress.console.print(message, highlight=False, soft_wrap=True)
