"""Per-image results of an evaluation, kept on disk so that an interrupted run resumes.

Layout of the folder (``<report>.images/`` beside the report)::

    settings.json      what produced the results (model, split, prompt, options)
    part-<rank>.jsonl  one JSON line per finished image, appended by that rank only

A line is written, flushed and fsynced as soon as its image is done, so at most the
image being processed when the run stopped is lost; a torn last line is dropped. Every
rank reads all parts, so a rerun may use a different number of processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from slimseg.errors import SlimsegError
from slimseg.io import atomic_write_text

__all__ = ["ResultStore"]

_SETTINGS = "settings.json"


class ResultStore:
    """The per-image results folder of one run with ``settings`` (a JSON-ready dict)."""

    def __init__(self, folder: str | Path, settings: dict) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # normalise tuples etc. for comparison
        self._handle: IO[str] | None = None

    def check(self, restart: bool) -> None:
        """Refuse a folder that is not an eval-coco results folder (no settings.json), and the
        results of a different run unless ``restart`` will discard them.

        Read-only, so every rank can call it and fail the same way before any collective.
        """
        if not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise SlimsegError(f"{self.folder}: exists and is not a folder; remove it or choose another --out")
        path = self.folder / _SETTINGS
        # ownership is checked with and without --restart: restart discards our results,
        # never a folder of the user's that happens to have the name
        if not path.is_file():
            if any(not _settings_leftover(entry) for entry in self.folder.iterdir()):
                raise SlimsegError(f"{self.folder}: not an eval-coco results folder (no {_SETTINGS}); remove it "
                                   "or choose another --out")
            return
        if restart:
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SlimsegError(f"{path}: unreadable ({error}); rerun with --restart to discard it") from None
        if not isinstance(stored, dict):
            raise SlimsegError(f"{path}: unreadable (not a JSON object); rerun with --restart to discard it")
        if stored != self.settings:
            changed = sorted(k for k in {*stored, *self.settings} if stored.get(k) != self.settings.get(k))
            first = changed[0]
            raise SlimsegError(f"{self.folder}: holds results of a different run ({first}: {stored.get(first)!r} "
                               f"now {self.settings.get(first)!r}); rerun with --restart to discard them, or "
                               "choose another --out")

    def prepare(self, restart: bool) -> None:
        """Create the folder and its settings file (one process only: rank 0); ``restart``
        deletes earlier results first; otherwise a folder of a different run is refused as
        ``check`` refuses it, so that its records are never scored as this run's."""
        self.check(restart)
        if restart and self.folder.is_dir():
            # only the files this class writes: anything else the user put there stays
            for part in self.folder.glob("part-*.jsonl"):
                if part.is_file() or part.is_symlink():
                    part.unlink()
            (self.folder / _SETTINGS).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for entry in self.folder.iterdir():
            if _settings_leftover(entry):
                entry.unlink()
        atomic_write_text(self.folder / _SETTINGS, json.dumps(self.settings, indent=1) + "\n")

    def records(self) -> dict[int, dict]:
        """Every stored per-image record, by image id (the first one wins if a rerun repeated it)."""
        found: dict[int, dict] = {}
        for part in sorted(self.folder.glob("part-*.jsonl")):
            with part.open(encoding="utf-8") as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                    except ValueError:  # the torn last line of an interrupted write
                        continue
                    found.setdefault(int(record["image_id"]), record)
        return found

    def open(self, rank: int) -> None:
        """Start appending to this rank's part, first cutting off a torn last line."""
        path = self.folder / f"part-{rank}.jsonl"
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as part:
                    part.truncate(data.rfind(b"\n") + 1)
        self._handle = path.open("a", encoding="utf-8")

    def append(self, record: dict) -> None:
        """Add one finished image's record durably (written, flushed and fsynced)."""
        if self._handle is None:
            raise RuntimeError("ResultStore.open(rank) must be called before append()")
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _settings_leftover(entry: Path) -> bool:
    """The temporary file of a settings.json write that a killed run (SIGKILL, power loss) left."""
    return entry.name.startswith(f".{_SETTINGS}.") and entry.name.endswith(".tmp") and entry.is_file()
