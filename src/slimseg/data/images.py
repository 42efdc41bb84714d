"""Read any common image file into the HxWx3 uint8 RGB array that SAM expects.

segment-anything's scripts read images with ``cv2.imread`` (alpha dropped, no
compositing) and convert BGR to RGB. We use Pillow instead so that EXIF orientation
is honoured and palette/grey/CMYK files work, and only fall back to OpenCV for
16-bit colour files, which Pillow truncates to their high byte.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from slimseg.errors import SlimsegError

__all__ = ["IMAGE_EXTENSIONS", "read_image"]

# Lower-case suffixes that count as images when a folder or glob is scanned.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)

_EXIF_ORIENTATION_TAG = 0x0112
# The transposition that undoes each EXIF orientation (same table as ImageOps.exif_transpose).
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: file to read; the format is detected from its content, not its suffix.

    Returns:
        C-contiguous uint8 array of shape (H, W, 3), RGB, upright per EXIF orientation.
        Alpha is dropped without compositing; 16-bit data is scaled by 1/257 (rounded);
        float data is clipped to 0..255.

    Raises:
        SlimsegError: the file is missing, a directory, empty, corrupt or truncated.
    """
    file = Path(path)
    if not file.exists():
        raise SlimsegError(f"{path}: no such file or directory")
    if file.is_dir():
        raise SlimsegError(f"{path}: is a directory, not an image file")
    try:
        rgb = _decode(file)
    except SlimsegError:
        raise
    except Exception as exc:  # Pillow and OpenCV raise many unrelated types for bad files
        raise SlimsegError(f"{path}: cannot read image ({_reason(exc)})") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise SlimsegError(f"{path}: cannot read image (it has zero width or height)")
    return rgb


def _decode(file: Path) -> np.ndarray:
    with warnings.catch_warnings():
        # Pillow warns (two raw lines on stderr) above MAX_IMAGE_PIXELS, where a large photo is
        # no attack here (above twice that it raises DecompressionBombError, which stays a
        # clean error), and about damaged metadata such as corrupt EXIF, which decoding skips.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        return _decode_quietly(file)


def _decode_quietly(file: Path) -> np.ndarray:
    with Image.open(file) as img:
        if _has_deep_colour(img):
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            img.load()
            # Pillow's 8-bit reading (the high bytes), upright: it settles which way is up
            upright = _to_rgb(ImageOps.exif_transpose(img)) if orientation in _ORIENTATION_FIX else None
            return _decode_deep_with_opencv(file, orientation, upright)
        # Decode inside the try of the caller so truncated files fail here, not later.
        img.load()
        upright = ImageOps.exif_transpose(img)
        return np.ascontiguousarray(_to_rgb(upright))


def _has_deep_colour(img: Image.Image) -> bool:
    """True for colour (or grey+alpha) files with more than 8 bits per sample.

    Pillow opens those in 8-bit modes and keeps only the high byte, so they need
    another decoder. 16-bit grey opens as "I;16" and is handled losslessly by Pillow.
    """
    # Only these formats store 16-bit colour; 16-bit BMP is packed 5-6-5, not deep.
    if img.format not in ("PNG", "TIFF"):
        return False
    if img.mode in _SIXTEEN_BIT_GREY_MODES or img.mode == "F":
        return False
    for tile in img.tile:
        args = tile.args
        rawmode = args if isinstance(args, str) else (args[0] if args else None)
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _decode_deep_with_opencv(file: Path, orientation: int, upright: np.ndarray | None) -> np.ndarray:
    data = np.fromfile(file, dtype=np.uint8)
    # IMREAD_UNCHANGED keeps 16-bit depth; the orientation is settled below.
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError("OpenCV could not decode its 16-bit pixel data")
    if decoded.ndim == 2:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    elif decoded.shape[2] == 2:  # grey + alpha
        decoded = cv2.cvtColor(decoded[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    else:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    rgb = _to_uint8(decoded)
    fix = _ORIENTATION_FIX.get(orientation)
    if fix is None or upright is None:
        return np.ascontiguousarray(rgb)
    # Some decoders turn an image upright themselves (OpenCV 5 and Pillow do for TIFF, not
    # for PNG): of the pixels as decoded and turned, keep those that match Pillow's reading.
    turned = np.asarray(Image.fromarray(rgb).transpose(fix))
    return np.ascontiguousarray(min((rgb, turned), key=lambda candidate: _difference(candidate, upright)))


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an (H, W, 3) uint8 RGB array."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_GREY_MODES or mode.startswith("I;") or mode == "F":
        grey = _to_uint8(np.asarray(img))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is understood (and then dropped) without
        # Pillow's warning about transparency stored as bytes.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integer data as 16-bit (value / 257, rounded) and float data as 0..255 (clipped)."""
    if values.dtype == np.uint8:
        return values
    if np.issubdtype(values.dtype, np.floating):
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(finite, 0.0, 255.0)).astype(np.uint8)
    wide = np.clip(values.astype(np.int64), 0, 65535)
    # Integer rounding of value / 257: no ties exist because 257 is odd.
    return ((wide + 128) // 257).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """A short one-line reason for a decoding failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    text = re.sub(r"\s+", " ", text).strip()
    return text or type(exc).__name__
