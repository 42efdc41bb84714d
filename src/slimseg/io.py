"""Writing outputs: atomic file writes, mask PNGs and colour overlays.

Every write goes to a temporary file beside the target and is renamed over it, so an
interrupted run never leaves a half-written PNG or JSON that looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from slimseg.errors import UsageError

__all__ = [
    "OVERLAY_PALETTE",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_dumps_strict",
    "refuse_overwriting_inputs",
    "render_overlay",
    "write_image_png",
    "write_mask_png",
]

# Qualitative palette (RGB): neighbours differ in hue, so adjacent masks stay apart.
OVERLAY_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (219, 219, 141),
    (158, 218, 229),
    (174, 199, 232),
)
_BOX_COLOUR = (0, 255, 0)
_POSITIVE_COLOUR = (0, 200, 0)
_NEGATIVE_COLOUR = (230, 0, 0)
_OUTLINE_COLOUR = (255, 255, 255)
_umask_lock = threading.Lock()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there
    is synced and renamed over ``path``, so readers see the old file or the new one, never a part.

    Parent folders are created. On failure the temporary file is removed, the previous
    file (if any) is left untouched, and the original exception (usually OSError) propagates.
    """
    target = Path(path)
    prefix = "." + target.name + "."
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=prefix, suffix=".tmp")
    except OSError as error:
        raise _naming_target(error, prefix, target) from None
    handle.close()
    temporary = Path(handle.name)
    try:
        yield temporary
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        # NamedTemporaryFile creates files readable by the owner only; outputs should
        # get the permissions an ordinary open() would have given them.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _naming_target(error, prefix, target) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _naming_target(error: OSError, prefix: str, target: Path) -> OSError:
    """``error`` about ``target`` where it names the hidden temporary file, which the user
    never asked for and which no longer exists."""
    if error.filename is not None and Path(error.filename).name.startswith(prefix):
        return type(error)(error.errno, error.strerror, str(target))
    return error


def refuse_overwriting_inputs(out: str | Path, inputs: Iterable[str | Path], option: str) -> None:
    """UsageError when the output ``out`` (given as ``option``) is one of the files that the
    command reads, however spelled (symlinks, .., hard links): the atomic write would replace
    it, losing the user's data. One stat per input (eval-coco passes every image of a split)."""
    try:
        target = os.stat(out)
    except OSError:
        return  # nothing there yet, so nothing to replace
    for path in inputs:
        try:
            found = os.stat(path)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
            alias = "" if str(out) == str(path) else f" (that is {path})"
            raise UsageError(f"{option} {out}{alias} is a file that this command reads: write the output elsewhere")


def remove_numbered_files(folder: Path, name: re.Pattern[str], first: int) -> None:
    """Remove the regular files in ``folder`` whose whole name matches ``name`` with a number
    (its first group) of ``first`` or more: the outputs that an earlier run with more of them
    left, so that the folder matches what was just written. Nothing else is touched."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = name.fullmatch(entry.name)
        if match and int(match.group(1)) >= first and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_dumps_strict(value: object) -> str:
    """``json.dumps`` that writes strict JSON: NaN and ±inf floats become null.

    Python's default writes them as the bare tokens NaN and Infinity, which strict parsers
    (jq, JavaScript's JSON.parse, Go, Rust) reject, so one bad score would break a whole stream.
    """
    return json.dumps(_finite_or_null(value), allow_nan=False)


def _finite_or_null(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """Write an (H, W) mask as a single-channel 8-bit PNG: 255 inside, 0 outside."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    grey = np.where(mask.astype(bool, copy=False), 255, 0).astype(np.uint8)
    atomic_write_bytes(path, _encode_png(Image.fromarray(grey)))


def write_image_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as a PNG."""
    _check_image(image)
    atomic_write_bytes(path, _encode_png(Image.fromarray(np.ascontiguousarray(image))))


def render_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw masks and the prompts that produced them over an image.

    Args:
        image: (H, W, 3) uint8 RGB; not modified.
        masks: (H, W) masks; mask i is tinted with ``OVERLAY_PALETTE[i % len]`` and
            outlined in the same colour.
        boxes: prompt boxes [x0, y0, x1, y1] in pixels, drawn as green rectangles.
        points: prompt points (x, y, label) in pixels; label 1 is drawn as a green dot,
            0 as a red dot (both with a white rim), -1 (SAM's padding) is skipped.
        alpha: weight of the mask colour in the blend, 0..1.

    Returns:
        A new (H, W, 3) uint8 RGB array.
    """
    _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in 0..1, got {alpha}")
    height, width = image.shape[:2]
    line = max(2, round(max(height, width) / 400))
    radius = max(3, round(max(height, width) / 150))
    out = image.copy()
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask {index} has shape {mask.shape}, image is {(height, width)}")
        inside = mask.astype(bool, copy=False)
        colour = OVERLAY_PALETTE[index % len(OVERLAY_PALETTE)]
        blended = out[inside].astype(np.float32) * (1.0 - alpha) + np.float32(alpha) * np.array(colour, np.float32)
        out[inside] = np.rint(blended).astype(np.uint8)
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour, thickness=line)
    for box in boxes or ():
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), _BOX_COLOUR, thickness=line)
    for point in points or ():
        x, y, label = float(point[0]), float(point[1]), int(point[2])
        if label == -1:
            continue
        if label not in (0, 1):
            raise ValueError(f"point label must be 1 (positive), 0 (negative) or -1, got {label}")
        centre = (int(round(x)), int(round(y)))
        fill = _POSITIVE_COLOUR if label == 1 else _NEGATIVE_COLOUR
        cv2.circle(out, centre, radius + max(1, line // 2), _OUTLINE_COLOUR, thickness=-1)
        cv2.circle(out, centre, radius, fill, thickness=-1)
    return out


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")


def _encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _umask() -> int:
    # The only portable way to read the umask is to set it; the lock keeps two threads
    # from racing on the swap, and caching means it happens once per process.
    with _umask_lock:
        current = os.umask(0o022)
        os.umask(current)
    return current


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort because not every OS or filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
