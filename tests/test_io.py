"""Output writing: atomic replacement, mask PNG format, and overlay rendering."""

from __future__ import annotations

import errno
import os
import stat
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimseg.io import (
    OVERLAY_PALETTE,
    atomic_write_bytes,
    atomic_write_text,
    json_dumps_strict,
    render_overlay,
    write_image_png,
    write_mask_png,
)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_creates_parents_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_text(target, '{"x": "é"}')
    assert target.read_bytes() == '{"x": "é"}'.encode("utf-8")
    assert _entries(target.parent) == ["out.json"]
    atomic_write_bytes(str(target), b"second")  # replaces, accepts str paths
    assert target.read_bytes() == b"second"
    assert _entries(target.parent) == ["out.json"]


def test_atomic_write_gives_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"x")
    umask = os.umask(0)
    os.umask(umask)
    # The temp file starts as 0600; the result should look like any open()-created file.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_write_failing_midway_keeps_previous_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "mask.png"
    target.write_bytes(b"previous")
    resource = pytest.importorskip("resource")  # POSIX only
    # A file-size limit makes the write fail partway through, as a full disk would.
    # (In-process because a subprocess would pay for importing torch again.)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
        with pytest.raises(OSError) as info:
            atomic_write_bytes(target, b"n" * 1_000_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == errno.EFBIG
    assert target.read_bytes() == b"previous"
    assert _entries(tmp_path) == ["mask.png"]


def test_wrong_data_type_keeps_previous_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(b"previous")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text is not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"previous"
    assert _entries(tmp_path) == ["out.json"]


def test_failed_replace_keeps_previous_and_removes_temp(tmp_path: Path) -> None:
    # Replacing a non-empty folder fails after the temp file was fully written.
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside.txt").write_text("keep")
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert _entries(tmp_path) == ["taken"]
    assert (target / "inside.txt").read_text() == "keep"


def test_strict_json_writes_non_finite_numbers_as_null() -> None:
    """Python's json writes NaN and Infinity as bare tokens that strict parsers reject."""
    import json

    record = {"score": float("nan"), "masks": [{"iou": float("inf")}, (1, -float("inf"))], "seconds": 0.5, "ok": True}
    text = json_dumps_strict(record)
    assert text == '{"score": null, "masks": [{"iou": null}, [1, null]], "seconds": 0.5, "ok": true}'
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-strict token {token}"))


def test_mask_png_is_single_channel_zero_or_255(tmp_path: Path) -> None:
    mask = np.zeros((7, 11), bool)
    mask[2:5, 3:9] = True
    path = tmp_path / "out" / "m.png"
    write_mask_png(path, mask)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode == "L"
        assert img.size == (11, 7)
        pixels = np.asarray(img)
    assert set(np.unique(pixels).tolist()) == {0, 255}
    np.testing.assert_array_equal(pixels == 255, mask)
    assert _entries(path.parent) == ["m.png"]


def test_mask_png_accepts_integer_masks(tmp_path: Path) -> None:
    mask = np.array([[0, 3], [1, 0]], np.uint8)
    path = tmp_path / "m.png"
    write_mask_png(path, mask)
    assert np.asarray(Image.open(path)).tolist() == [[0, 255], [255, 0]]


def test_mask_png_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mask_png(tmp_path / "m.png", np.zeros((2, 2, 1), bool))
    assert not (tmp_path / "m.png").exists()


def test_image_png_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    write_image_png(path, image)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), image)
    with pytest.raises(ValueError):
        write_image_png(tmp_path / "bad.png", image[:, :, 0])


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:70, 40:100] = True
    return image, mask


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by a square of the given radius (for 'near the contour' zones)."""
    out = mask.copy()
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def test_overlay_tints_masked_pixels_only(tmp_path: Path) -> None:
    image, mask = _scene()
    before = image.copy()
    out = render_overlay(image, [mask], alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out is not image
    far_outside = ~_grow(mask, 4)
    np.testing.assert_array_equal(out[far_outside], image[far_outside])
    # Interior (away from the 2 px contour): exactly the 50/50 blend with the first colour.
    interior = mask & ~_grow(~mask, 4)
    expected = np.rint(image[interior] * 0.5 + np.array(OVERLAY_PALETTE[0]) * 0.5)
    np.testing.assert_array_equal(out[interior], expected.astype(np.uint8))
    # The contour is drawn in the mask's colour.
    assert out[50, 40].tolist() == list(OVERLAY_PALETTE[0])


def test_overlay_masks_get_distinct_deterministic_colours() -> None:
    image = np.zeros((60, 60, 3), np.uint8)
    first = np.zeros((60, 60), bool)
    first[5:25, 5:25] = True
    second = np.zeros((60, 60), bool)
    second[35:55, 35:55] = True
    out = render_overlay(image, [first, second], alpha=1.0)
    assert out[15, 15].tolist() == list(OVERLAY_PALETTE[0])
    assert out[45, 45].tolist() == list(OVERLAY_PALETTE[1])
    assert OVERLAY_PALETTE[0] != OVERLAY_PALETTE[1]
    np.testing.assert_array_equal(out, render_overlay(image, [first, second], alpha=1.0))


def test_overlay_alpha_zero_keeps_interior() -> None:
    image, mask = _scene()
    out = render_overlay(image, [mask], alpha=0.0)
    interior = mask & ~_grow(~mask, 4)
    np.testing.assert_array_equal(out[interior], image[interior])


def test_overlay_draws_prompts() -> None:
    image = np.full((200, 300, 3), 50, np.uint8)
    out = render_overlay(
        image,
        [],
        boxes=[[20, 30, 120, 150]],
        points=[(200, 50, 1), (250, 150, 0), (10, 190, -1)],
    )
    assert out[90, 20].tolist() == [0, 255, 0]  # left edge of the box
    assert out[90, 70].tolist() == [50, 50, 50]  # inside the box is left alone
    positive, negative = out[50, 200], out[150, 250]
    assert positive[1] > 150 and positive[0] < 50  # green
    assert negative[0] > 150 and negative[1] < 50  # red
    # A white rim surrounds each dot.
    assert (out[50, 200 - 4 : 200 + 5] == 255).all(axis=1).any()
    assert out[190, 10].tolist() == [50, 50, 50]  # label -1 is padding, not drawn
    assert out[5, 5].tolist() == [50, 50, 50]


def test_overlay_point_size_grows_with_image() -> None:
    def dot_area(size: int) -> int:
        image = np.zeros((size, size, 3), np.uint8)
        out = render_overlay(image, [], points=[(size // 2, size // 2, 1)])
        return int((out.sum(axis=2) > 0).sum())

    assert dot_area(2000) > 4 * dot_area(100)


def test_overlay_rejects_mismatched_inputs() -> None:
    image, mask = _scene()
    with pytest.raises(ValueError):
        render_overlay(image, [mask[:10]])
    with pytest.raises(ValueError):
        render_overlay(image[:, :, :2], [mask])
    with pytest.raises(ValueError):
        render_overlay(image, [mask], points=[(1, 1, 2)])
    with pytest.raises(ValueError):
        render_overlay(image, [mask], alpha=1.5)


def test_a_failed_atomic_write_names_the_target_not_its_temporary_file(tmp_path):
    target = tmp_path / "mask.png"
    target.mkdir()
    (target / "kept").write_text("the user's")
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"data")
    assert caught.value.filename == str(target) and ".tmp" not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no temporary file left
