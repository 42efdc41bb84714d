"""Export folders: which existing folder an export may replace, and building a new one beside
its final place so that it appears only when complete.

Shared by ``--format onnx`` and ``--format safetensors``; needs neither onnx nor onnxruntime.
"""

from __future__ import annotations

import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slimseg.errors import UsageError
from slimseg.export.manifest import is_export_folder

SAFETENSORS_FILE = "model.safetensors"

__all__ = ["SAFETENSORS_FILE", "check_out_folder", "export_safetensors", "is_safetensors_export", "staging_folder"]


def is_safetensors_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``slimseg export --format safetensors``: it
    holds model.safetensors and nothing else."""
    folder = Path(path)
    return folder.is_dir() and [entry.name for entry in folder.iterdir()] == [SAFETENSORS_FILE]


def check_out_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier export (ONNX or safetensors) or an empty folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not (is_export_folder(out) or is_safetensors_export(out)):
        raise UsageError(f"--out {out} is a non-empty folder that is not an earlier export: refusing to overwrite it")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_hidden_folder(out.parent, f".{out.name}.")
    try:
        yield staging
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.time_ns()}")
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
