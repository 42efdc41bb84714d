"""read_image: every pixel layout we accept, EXIF orientation, and every way a file can be bad."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from slimseg.data.images import IMAGE_EXTENSIONS, read_image
from slimseg.errors import SlimsegError


def _check_rgb(arr: np.ndarray, height: int, width: int) -> None:
    assert arr.shape == (height, width, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def _pattern(height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("suffix", "options"),
    [(".png", {}), (".bmp", {}), (".tif", {}), (".webp", {"lossless": True})],
)
def test_lossless_rgb_formats_round_trip(tmp_path: Path, suffix: str, options: dict) -> None:
    pixels = _pattern()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(pixels).save(path, **options)
    out = read_image(path)
    _check_rgb(out, 24, 32)
    np.testing.assert_array_equal(out, pixels)


def test_accepts_str_path_and_ignores_misleading_suffix(tmp_path: Path) -> None:
    pixels = _pattern()
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(pixels).save(path, format="PNG")
    np.testing.assert_array_equal(read_image(str(path)), pixels)


def test_grey_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) % 256
    path = tmp_path / "grey.png"
    Image.fromarray(grey.astype(np.uint8)).save(path)
    out = read_image(path)
    _check_rgb(out, 24, 32)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def test_bilevel_image_is_black_and_white(tmp_path: Path) -> None:
    img = Image.new("1", (8, 4), 0)
    img.putpixel((3, 2), 1)
    path = tmp_path / "bits.png"
    img.save(path)
    out = read_image(path)
    _check_rgb(out, 4, 8)
    assert out[2, 3].tolist() == [255, 255, 255]
    assert out.sum() == 3 * 255


def test_grey_alpha_drops_alpha_without_compositing(tmp_path: Path) -> None:
    # Fully transparent pixels keep their grey value, as cv2.imread would give.
    img = Image.new("LA", (6, 5), (100, 0))
    img.putpixel((1, 1), (200, 255))
    path = tmp_path / "la.png"
    img.save(path)
    out = read_image(path)
    _check_rgb(out, 5, 6)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[1, 1].tolist() == [200, 200, 200]


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 20, 30
    rgba[2:, :, 3] = 255  # top rows fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    out = read_image(path)
    _check_rgb(out, 5, 6)
    assert (out.reshape(-1, 3) == [10, 20, 30]).all()


def test_palette_image_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 3), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.putpixel((2, 1), 1)
    path = tmp_path / "palette.png"
    img.save(path, transparency=b"\x00\x80")  # partial alpha: stored as bytes
    # Pillow warns when palette transparency is converted to RGB directly; we must not.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(path)
    _check_rgb(out, 3, 4)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[1, 2].tolist() == [0, 0, 255]


def _sixteen_bit_values() -> np.ndarray:
    # Values around the rounding boundaries of v / 257 plus the extremes.
    row = [0, 1, 128, 129, 257, 257 * 100 + 128, 257 * 100 + 129, 30000, 65534, 65535]
    return np.array([row, row[::-1]], dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grey_scaled_with_rounding(tmp_path: Path, suffix: str) -> None:
    values = _sixteen_bit_values()
    path = tmp_path / f"grey16{suffix}"
    assert cv2.imwrite(str(path), values)
    out = read_image(path)
    _check_rgb(out, *values.shape)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert expected[0, 2] == 0 and expected[0, 3] == 1  # the boundary really is exercised
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], expected)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_colour_keeps_precision_and_channel_order(tmp_path: Path, suffix: str) -> None:
    values = _sixteen_bit_values()
    red, green, blue = values, values[:, ::-1].copy(), np.full_like(values, 1000)
    path = tmp_path / f"rgb16{suffix}"
    assert cv2.imwrite(str(path), np.dstack([blue, green, red]))  # OpenCV writes BGR
    out = read_image(path)
    _check_rgb(out, *values.shape)
    np.testing.assert_array_equal(out[:, :, 0], np.rint(red / 257.0))
    np.testing.assert_array_equal(out[:, :, 1], np.rint(green / 257.0))
    # 1000 / 257 = 3.89: plain truncation to the high byte would give 3.
    assert (out[:, :, 2] == 4).all()


def test_sixteen_bit_rgba_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((3, 4, 4), np.uint16)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 257 * 10, 257 * 20, 257 * 30, 0
    path = tmp_path / "rgba16.png"
    assert cv2.imwrite(str(path), bgra)
    out = read_image(path)
    _check_rgb(out, 3, 4)
    assert (out.reshape(-1, 3) == [30, 20, 10]).all()


def test_int32_tiff_clipped_to_sixteen_bit_range(tmp_path: Path) -> None:
    values = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    path = tmp_path / "int32.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    out = read_image(path)
    assert out[:, :, 0].tolist() == [[0, 0, 1, 255, 255]]
    assert out[:, :, 2].tolist() == [[0, 0, 1, 255, 255]]


def test_float_tiff_clipped_to_byte_range(tmp_path: Path) -> None:
    values = np.array([[-3.0, 0.4, 100.6, 254.7, 300.0, np.nan]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    out = read_image(path)
    assert out[:, :, 1].tolist() == [[0, 0, 101, 255, 255, 0]]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    img.paste((255, 0, 0, 0), (8, 0, 16, 8))  # cyan on the right half
    path = tmp_path / "cmyk.jpg"
    img.save(path, quality=95)
    out = read_image(path)
    _check_rgb(out, 8, 16)
    assert np.abs(out[4, 2].astype(int) - [255, 0, 0]).max() < 12
    assert np.abs(out[4, 13].astype(int) - [0, 255, 255]).max() < 12


def _marked_image() -> np.ndarray:
    """20 rows x 40 columns; a red block top-left, a blue block bottom-right, grey elsewhere."""
    pixels = np.full((20, 40, 3), 128, np.uint8)
    pixels[:8, :8] = [255, 0, 0]
    pixels[12:, 32:] = [0, 0, 255]
    return pixels


def test_exif_orientation_six_is_rotated_clockwise(tmp_path: Path) -> None:
    stored = _marked_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    out = read_image(path)
    _check_rgb(out, 40, 20)
    # Clockwise turn: stored top-left lands top-right, stored bottom-right lands bottom-left.
    assert np.abs(out[2, 17].astype(int) - [255, 0, 0]).max() < 30
    assert np.abs(out[37, 2].astype(int) - [0, 0, 255]).max() < 30
    assert np.abs(out.astype(int) - np.rot90(stored, k=-1)).mean() < 4


def _png_with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    if payload.startswith(b"Exif\x00\x00"):
        payload = payload[6:]
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied_to_sixteen_bit_colour(tmp_path: Path, orientation: int) -> None:
    stored = _marked_image()
    ok, encoded = cv2.imencode(".png", stored[:, :, ::-1].astype(np.uint16) * 257)
    assert ok
    path = tmp_path / "deep_rotated.png"
    path.write_bytes(_png_with_exif_orientation(encoded.tobytes(), orientation))
    assert Image.open(path).getexif()[0x0112] == orientation
    turns = {3: 2, 6: -1, 8: 1}[orientation]
    expected = np.rot90(stored, k=turns)
    out = read_image(path)
    _check_rgb(out, *expected.shape[:2])
    np.testing.assert_array_equal(out, expected)


def _sixteen_bit_tiff(rgb: np.ndarray, orientation: int) -> bytes:
    """An uncompressed 16-bit RGB TIFF of ``rgb`` (H, W, 3) uint16 with an Orientation tag
    (Pillow cannot write 16-bit colour)."""
    height, width, _ = rgb.shape
    pixels = rgb.astype("<u2").tobytes()
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (274, 3, 1, orientation), (277, 3, 1, 3), (278, 3, 1, height),
               (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = 8 + ifd_size
    pixel_offset = bits_offset + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_offset, 273: pixel_offset}.get(tag, value)
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + struct.pack("<HHH", 16, 16, 16) + pixels


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied_once_to_sixteen_bit_tiff(tmp_path: Path, orientation: int) -> None:
    stored = _marked_image()
    path = tmp_path / "deep_rotated.tif"
    path.write_bytes(_sixteen_bit_tiff(stored.astype(np.uint16) * 257, orientation))
    expected = np.rot90(stored, k={1: 0, 3: 2, 6: -1, 8: 1}[orientation])
    np.testing.assert_array_equal(read_image(path), expected)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(SlimsegError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: no such file or directory"


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SlimsegError, match="directory"):
        read_image(tmp_path)


def _assert_cannot_read(path: Path) -> str:
    with pytest.raises(SlimsegError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read image (")
    assert message.endswith(")")
    assert "\n" not in message
    return message


def test_corrupt_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    assert "not a recognised image format" in _assert_cannot_read(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_cannot_read(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error_not_a_partial_image(tmp_path: Path, fmt: str) -> None:
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(_pattern(64, 64)).save(full, format=fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _assert_cannot_read(path)


def test_png_header_claiming_zero_width(tmp_path: Path) -> None:
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / "zero.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    _assert_cannot_read(path)


def test_large_image_reads_without_pillows_decompression_bomb_warning(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Between MAX_IMAGE_PIXELS and twice that, Pillow warns on stderr (two lines); a big
    photo is no attack on us, so it reads silently. Above twice the limit stays an error."""
    path = tmp_path / "big.png"
    Image.fromarray(_pattern(40, 50)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 2000 pixels: in the warning range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_rgb(read_image(path), 40, 50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)  # over twice the limit
    assert "decompression bomb" in _assert_cannot_read(path).lower()


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} == IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_corrupt_exif_metadata_is_skipped_without_a_warning(tmp_path: Path) -> None:
    # IFD0: Orientation 6 and an Exif sub-IFD pointer far past the end of the data
    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x02\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00"
            b"i\x87\x04\x00\x01\x00\x00\x00\x00\x00\xff\x7f\x00\x00\x00\x00")
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(_marked_image()).save(path, exif=exif, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(path)
    _check_rgb(out, 40, 20)  # the orientation, which is intact, still applies
