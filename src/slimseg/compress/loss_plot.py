"""Draw the training-loss curve as a PNG with Pillow alone (no plotting library at runtime)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from slimseg.io import atomic_output

__all__ = ["draw_loss_curve", "nice_ticks"]

_BACKGROUND = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_LINE = (31, 119, 180)
_EPOCH = (214, 39, 40)
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 90, 30, 50, 60


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_loss_curve(
    path: Path,
    steps: Sequence[int],
    losses: Sequence[float],
    epoch_ends: Sequence[tuple[int, int]],
    title: str = "Distillation loss",
    size: tuple[int, int] = (800, 500),
    y_label: str = "loss (MSE)",
) -> None:
    """Write the per-step loss polyline with epoch markers to ``path`` atomically.

    Args:
        steps, losses: the logged optimizer steps and their losses (same length; non-finite
            losses are left out).
        epoch_ends: (epoch, last step of that epoch) pairs, drawn as dashed verticals.
        size: (width, height) in pixels.
        y_label: what the loss is (distillation: MSE; mask training: focal + dice + IoU).
            It is also stored with the title as PNG text ("Title", "YLabel"), so that tools
            can tell the curves of different runs apart without reading pixels.
    """
    width, height = size
    image = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    label_font, title_font = _font(13), _font(18)
    left, right = _MARGIN_LEFT, width - _MARGIN_RIGHT
    top, bottom = _MARGIN_TOP, height - _MARGIN_BOTTOM
    draw.text(((left + right) / 2, 18), title, fill=_AXIS, font=title_font, anchor="mt")

    points = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v)]
    last_step = max([s for s, _ in points] + [s for _, s in epoch_ends] + [1])
    x_ticks = nice_ticks(0, last_step, 8)
    values = [v for _, v in points]
    y_ticks = nice_ticks(min(values + [0.0]), max(values + [0.0]), 6) if values else nice_ticks(0, 1)
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def to_pixel(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x_low) / (x_high - x_low) * (right - left)
        y = bottom - (value - y_low) / (y_high - y_low) * (bottom - top)
        return x, y

    for tick in y_ticks:
        _, y = to_pixel(x_low, tick)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - 5, y), (left, y)], fill=_AXIS)
        draw.text((left - 8, y), _format(tick), fill=_AXIS, font=label_font, anchor="rm")
    for tick in x_ticks:
        x, _ = to_pixel(tick, y_low)
        draw.line([(x, bottom), (x, bottom + 5)], fill=_AXIS)
        draw.text((x, bottom + 8), _format(tick), fill=_AXIS, font=label_font, anchor="mt")
    for epoch, step in epoch_ends:
        x, _ = to_pixel(step, y_low)
        for y in range(top, bottom, 8):  # dashed, so it does not read as data
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=_EPOCH)
        draw.text((x - 3, top + 3), f"e{epoch}", fill=_EPOCH, font=label_font, anchor="rt")
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    draw.text(((left + right) / 2, height - 20), "optimizer step", fill=_AXIS, font=label_font, anchor="mm")
    draw.text((left, top - 6), y_label, fill=_AXIS, font=label_font, anchor="lb")

    pixels = [to_pixel(s, v) for s, v in points]
    if len(pixels) > 1:
        draw.line(pixels, fill=_LINE, width=2, joint="curve")
    for x, y in pixels if len(pixels) <= 60 else ():
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=_LINE)
    info = PngInfo()
    info.add_itxt("Title", title)
    info.add_itxt("YLabel", y_label)
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
