"""Turn command-line input specs (files, folders, globs, "-") into a list of images.

Each image gets a ``key``: a relative output name without suffix, unique across the
run, so outputs of different inputs never overwrite each other and recursive runs
mirror the input tree.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from slimseg.data.images import IMAGE_EXTENSIONS
from slimseg.errors import SlimsegError, UsageError

__all__ = ["ImageInput", "expand_inputs"]

_GLOB_CHARS = frozenset("*?[")
_EXTENSION_LIST = " ".join(sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class ImageInput:
    """One image to process.

    Attributes:
        path: the file, as found (relative paths stay relative).
        key: unique output name without suffix, '/'-separated, e.g. "photo" or "trip/day1/img_3".
    """

    path: Path
    key: str


def expand_inputs(
    specs: list[str], recursive: bool = False, stdin: TextIO | None = None, null_separated: bool = False
) -> list[ImageInput]:
    """Expand input specs into images, in the order given.

    Specs:
        * an existing file: taken whatever its suffix (reading it reports non-images);
        * a path that does not exist: taken too, so that it fails alone when the command
          reads it ("no such file or directory") and the other images are still processed;
        * a folder: images (by ``IMAGE_EXTENSIONS``) directly inside, or at all depths
          when ``recursive``; hidden files and folders skipped; sorted by relative path;
        * a glob with ``*?[`` (``**`` spans folders): matching image files, sorted;
          an existing path with those characters is taken literally instead;
        * ``-``: one path (file or folder, never a glob) per line of ``stdin``
          (default ``sys.stdin``); blank lines and lines starting with '#' are ignored.
          With ``null_separated`` the paths are separated by NUL characters instead
          (``find -print0``) and taken exactly as given, so names may hold newlines.

    A file reached twice (by any route) is taken once, with its first key. Keys that
    collide (ignoring case, for case-insensitive filesystems) get ``_2``, ``_3``, ...

    Raises:
        SlimsegError: none of the paths exists, a glob matches nothing, a folder, glob or
            stdin yields no images, or no specs were given.
        UsageError: ``null_separated`` without ``-`` among the specs, or with lines and no
            NUL characters on stdin.
    """
    if not specs:
        raise SlimsegError("no inputs given: pass image files, folders or glob patterns")
    if null_separated and "-" not in specs:
        raise UsageError("--null applies to paths read from standard input: give - as an input")
    found: list[tuple[Path, str]] = []
    for spec in specs:
        if spec == "-":
            stream = stdin if stdin is not None else sys.stdin
            names = _null_separated_names(stream) if null_separated else _line_names(stream)
            found.extend(_from_stdin(names, recursive))
        elif not os.path.lexists(spec) and _GLOB_CHARS.intersection(spec):
            found.extend(_from_glob(spec))
        else:
            found.extend(_from_path(spec, recursive))
    inputs = _deduplicate(found)
    # missing files fail one by one later, but a run where nothing exists is a mistake up front
    if not any(image.path.exists() for image in inputs):
        raise SlimsegError(_none_exists(inputs))
    return inputs


def _none_exists(inputs: list[ImageInput]) -> str:
    others = len(inputs) - 1
    tail = "" if not others else " (nor does the other input)" if others == 1 else \
        f" (nor does any of the other {others} inputs)"
    return f"{inputs[0].path}: no such file or directory{tail}"


def _from_path(spec: str, recursive: bool) -> list[tuple[Path, str]]:
    path = Path(spec)
    if not path.is_dir():  # a file, or a missing path that the command reports when it reads it
        return [(path, path.stem)]
    images = _scan_folder(path, recursive)
    if not images:
        hint = "" if recursive else "; subfolders are only searched when recursive"
        raise SlimsegError(f"{spec}: no images found in this folder (looked for {_EXTENSION_LIST}{hint})")
    return images


def _scan_folder(folder: Path, recursive: bool) -> list[tuple[Path, str]]:
    """Image files in ``folder`` with keys relative to it, sorted by relative path."""
    relative: list[tuple[str, ...]] = []
    for root, dirs, files in os.walk(folder):
        if recursive:
            # Pruning in place stops os.walk from descending into hidden folders.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        else:
            dirs[:] = []
        prefix = Path(root).relative_to(folder).parts
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                relative.append((*prefix, name))
    relative.sort()
    return [(folder.joinpath(*parts), _key(parts)) for parts in relative]


def _from_glob(pattern: str) -> list[tuple[Path, str]]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise SlimsegError(f"{pattern}: no files match this pattern")
    root = _glob_root(pattern)
    images = []
    for match in matches:
        if os.path.isfile(match) and Path(match).suffix.lower() in IMAGE_EXTENSIONS:
            parts = Path(os.path.relpath(match, root)).parts
            images.append((Path(match), _key(parts)))
    if not images:
        raise SlimsegError(f"{pattern}: the pattern matches no image files (looked for {_EXTENSION_LIST})")
    return images


def _glob_root(pattern: str) -> str:
    """The folder before the first wildcard, so keys mirror the tree below it."""
    parts = Path(pattern).parts[:-1]  # the last part names files, never the root
    fixed: list[str] = []
    for part in parts:
        if _GLOB_CHARS.intersection(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _line_names(stream: TextIO) -> Iterator[str]:
    for raw in stream:
        line = raw.rstrip("\r\n")
        # a file name may begin or end with spaces; spaces around an existing path are padding
        if not os.path.lexists(line) and os.path.lexists(line.strip()):
            line = line.strip()
        if line.strip() and not line.strip().startswith("#"):
            yield line


def _null_separated_names(stream: TextIO) -> list[str]:
    # bytes where the stream has them, so that names in any encoding come through as the
    # file system spells them
    buffer = getattr(stream, "buffer", None)
    text = os.fsdecode(buffer.read()) if buffer is not None else stream.read()
    if "\0" not in text and "\n" in text.strip():
        raise UsageError("--null: standard input holds lines but no NUL characters; "
                         "give the paths with find -print0, or leave out --null")
    return [name for name in text.split("\0") if name]


def _from_stdin(names: Iterable[str], recursive: bool) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for name in names:
        found.extend(_from_path(name, recursive))
    if not found:
        raise SlimsegError("-: no image paths were read from standard input")
    return found


def _key(parts: tuple[str, ...]) -> str:
    """'/'-joined relative path with the file's suffix removed."""
    return "/".join((*parts[:-1], Path(parts[-1]).stem))


def _deduplicate(found: list[tuple[Path, str]]) -> list[ImageInput]:
    seen_files: set[Path] = set()
    used_keys: set[str] = set()
    inputs: list[ImageInput] = []
    for path, key in found:
        identity = path.resolve()
        if identity in seen_files:
            continue
        seen_files.add(identity)
        unique = key
        suffix = 2
        while unique.casefold() in used_keys:
            unique = f"{key}_{suffix}"
            suffix += 1
        used_keys.add(unique.casefold())
        inputs.append(ImageInput(path=path, key=unique))
    if not inputs:
        raise SlimsegError("no images found in the given inputs")
    return inputs
