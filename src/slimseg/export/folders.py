"""Export folders: which existing folder an export may replace, and building a new one beside
its final place so that it appears only when complete.

Shared by ``--format onnx`` and ``--format safetensors``; needs neither onnx nor onnxruntime.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slimseg.errors import SlimsegError, UsageError
from slimseg.export.manifest import MANIFEST_NAME, read_manifest

SAFETENSORS_FILE = "model.safetensors"
# A staging folder untouched this long belongs to an export that was killed (SIGKILL, power
# loss): none writes nothing for an hour, so the next export into the same --out removes it.
STALE_AFTER_S = 3600.0

__all__ = ["SAFETENSORS_FILE", "check_out_folder", "export_safetensors", "is_safetensors_export", "out_path",
           "remove_stale_staging", "staging_folder"]


def is_safetensors_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``slimseg export --format safetensors``: it
    holds model.safetensors and nothing else."""
    folder = Path(path)
    return (folder.is_dir() and [entry.name for entry in folder.iterdir()] == [SAFETENSORS_FILE]
            and (folder / SAFETENSORS_FILE).is_file())


def out_path(out: str | Path) -> Path:
    """``--out`` as the real folder to replace: absolute, so that "." and "x/.." have a name
    and a parent to build beside, and with symlinks followed, so that a link to an earlier
    export keeps pointing at the replaced folder."""
    resolved = Path(out).expanduser().resolve()
    if resolved == resolved.parent:
        raise UsageError(f"--out {out} is the root folder: give a folder to write")
    return resolved


def _listed(names: list[str], folder: Path) -> str:
    shown = [f"{name}/" if (folder / name).is_dir() else name for name in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_out_folder(out: str | Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier export (ONNX or
    safetensors) holding only the files slimseg wrote: replacing deletes the folder whole."""
    given, out = out, out_path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {given} is a file: give a folder")
    if not out.is_dir():
        return
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    if MANIFEST_NAME in entries:
        try:
            manifest = read_manifest(out)
        except SlimsegError as error:
            raise UsageError(f"--out {given} holds a {MANIFEST_NAME} that is not a valid export manifest "
                             f"({str(error).splitlines()[0]}): refusing to overwrite the folder") from None
        written = {MANIFEST_NAME} | {name for files in manifest["variants"].values() for name in files.values()}
    elif (out / SAFETENSORS_FILE).is_file():
        written = {SAFETENSORS_FILE}
    else:
        raise UsageError(f"--out {given} is a non-empty folder that is not an earlier export: refusing to overwrite it")
    unexpected = [name for name in entries if name not in written]
    if unexpected:
        raise UsageError(f"--out {given} is an earlier export but also holds {_listed(unexpected, out)}, which "
                         f"`slimseg export` did not write: refusing to overwrite it (move them elsewhere first)")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {given}: no permission to replace it in {out.parent}")


def remove_stale_staging(out: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove what killed exports into ``out`` left beside it: staging folders (and old
    exports renamed aside) untouched for ``max_age_s``. A younger one may belong to an
    export still running. Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.([0-9a-f]{{8}}\.tmp|old-[0-9]+)")
    removed = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else ():
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            # a file still being written refreshes its own mtime, not the folder's
            newest = max([entry.stat().st_mtime, *(child.stat().st_mtime for child in entry.iterdir())])
        except OSError:  # finished or removed meanwhile by its own export
            continue
        if time.time() - newest > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _make_hidden_folder(parent: Path, prefix: str) -> Path:
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp creates mode 0700, while the export
    # should get the permissions any folder the user creates gets (0777 less the umask).
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it on success and vanishes on failure."""
    out = out_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = _make_hidden_folder(out.parent, f".{out.name}.")
    try:
        yield staging
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(out: Path, staging: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        _fill(out, staging)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # the earlier export stays where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fill(out: Path, staging: Path) -> None:
    """Move the staged files into the empty folder ``out`` rather than replacing it, so that a
    shell inside it (``--out .``) sees them; the manifest comes last, so the folder is an
    export only once complete."""
    moved: list[Path] = []
    try:
        for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == MANIFEST_NAME):
            entry.rename(out / entry.name)
            moved.append(out / entry.name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    staging.rmdir()


def export_safetensors(source: str | Path, out: str | Path, offline: bool = False) -> dict[str, object]:
    """``slimseg export --format safetensors``: the folder ``out`` holding model.safetensors,
    replacing an earlier export there (and refusing any other non-empty folder).

    Returns {"source", "format": "safetensors", "out", "files", "source_format"}: what stdout prints.
    """
    from slimseg.zoo.loading import convert_checkpoint

    out = Path(out)
    check_out_folder(out)
    with staging_folder(out) as staging:
        converted = convert_checkpoint(source, staging / SAFETENSORS_FILE, offline=offline)
    return {"source": str(source), "format": "safetensors", "out": str(out), "files": [SAFETENSORS_FILE],
            "source_format": converted["format"]}
