"""Prompts for one object (points and/or a box), parsing them, and decoding many at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.predictor import Predictor, checked_box, checked_points


@dataclass(frozen=True)
class Prompt:
    """Everything that describes one object: (N, 2) XY points with (N,) labels (1 foreground,
    0 background), and/or an XYXY box, in original-image pixels. Sequences and numpy arrays
    are accepted and stored as tuples of Python numbers."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        points, labels = checked_points(self.points, self.labels, ("points", "labels"))
        box = None if self.box is None else checked_box(self.box, "box", "make one Prompt per box")
        if len(points) == 0 and box is None:
            raise SlimsegError("a prompt needs at least one point or a box")
        # tuples whatever was given, so that equal prompts compare and hash equal
        object.__setattr__(self, "points", tuple(map(tuple, points.tolist())))
        object.__setattr__(self, "labels", tuple(labels.tolist()))
        object.__setattr__(self, "box", None if box is None else tuple(box.tolist()))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        # floats throughout, so a clipped box reads [0.0, 0.0, 320.0, 180.0] like any other
        if self.points:
            data["points"] = [[float(x), float(y), int(label)] for (x, y), label in zip(self.points, self.labels)]
        if self.box is not None:
            data["box"] = [float(v) for v in self.box]
        return data


def _numbers(text: str, what: str, counts: Sequence[int]) -> list[float]:
    try:
        values = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(np.isfinite(values)):
        raise UsageError(f"malformed {what} {text!r}")
    return values


def _ordered_box(numbers: Sequence[float], malformed: str) -> tuple[float, float, float, float]:
    """Four numbers as a box, which needs x1 > x0 and y1 > y0; ``malformed`` starts the error."""
    x0, y0, x1, y1 = numbers
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"{malformed}: need x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def _labelled_point(numbers: Sequence[float], malformed: str) -> tuple[float, float, int]:
    """x, y and an optional label (1 = foreground, the default, or 0 = background)."""
    label = numbers[2] if len(numbers) == 3 else 1.0
    if label not in (0.0, 1.0):
        raise UsageError(f"{malformed}: label must be 1 (foreground) or 0 (background)")
    return numbers[0], numbers[1], int(label)


def parse_box(text: str, name: str = "--box") -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` in pixels → a box; x1 > x0 and y1 > y0 are required."""
    return _ordered_box(_numbers(text, f"{name} (expected x0,y0,x1,y1 in pixels)", (4,)), f"malformed {name} {text!r}")


def parse_point(text: str, name: str = "--point") -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` (label 1 = foreground, 0 = background)."""
    values = _numbers(text, f"{name} (expected x,y or x,y,label in pixels)", (2, 3))
    return _labelled_point(values, f"malformed {name} {text!r}")


def prompts_from_options(boxes: Sequence[str], points: Sequence[str]) -> list[Prompt]:
    """Command-line prompts: each ``--box`` is one object; the ``--point``s form one object
    together, or refine the box when exactly one box is given."""
    parsed_boxes = [parse_box(text) for text in boxes]
    parsed_points = [parse_point(text) for text in points]
    coords = tuple((x, y) for x, y, _ in parsed_points)
    labels = tuple(label for _, _, label in parsed_points)
    if parsed_points and len(parsed_boxes) > 1:
        raise UsageError("--point with several --box options is ambiguous: pair them in a --prompts file")
    if parsed_points and parsed_boxes:
        return [Prompt(coords, labels, parsed_boxes[0])]
    if parsed_points:
        return [Prompt(coords, labels)]
    return [Prompt(box=box) for box in parsed_boxes]


_PROMPT_KEYS = ("box", "points")
_POINT_FORM = "[x, y] or [x, y, label] in pixels"


def _shown(value: Any) -> str:
    """A JSON value as the file spells it, cut short so the message stays one short line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite_numbers(value: Any, counts: Sequence[int]) -> list[float] | None:
    """``value`` as floats if it is a JSON list of ``counts`` finite numbers, else None."""
    if not isinstance(value, list) or len(value) not in counts:
        return None
    # bool is an int to Python, but true/false in a box is a mistake, not 1/0
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    numbers = [float(v) for v in value]
    return numbers if all(np.isfinite(numbers)) else None


def _box_from_json(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    numbers = _finite_numbers(value, (4,))
    if numbers is None:
        raise UsageError(f"{where}: malformed 'box' {_shown(value)}: expected [x0, y0, x1, y1] in pixels")
    return _ordered_box(numbers, f"{where}: malformed 'box' {_shown(value)}")


def _points_from_json(value: Any, where: str) -> list[tuple[float, float, int]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UsageError(f"{where}: 'points' must be a list of {_POINT_FORM}, got {_shown(value)}")
    if _finite_numbers(value, (2, 3)) is not None:  # [x, y] where [[x, y]] was meant
        raise UsageError(f"{where}: 'points' must be a list of points: write one point as [{_shown(value)}]")
    points = []
    for index, item in enumerate(value):
        numbers = _finite_numbers(item, (2, 3))
        if numbers is None:
            raise UsageError(f"{where}: malformed point {index} {_shown(item)} in 'points': expected {_POINT_FORM}")
        points.append(_labelled_point(numbers, f"{where}: malformed point {index} {_shown(item)} in 'points'"))
    return points


def _prompt_from_json(item: Any, where: str) -> Prompt:
    if not isinstance(item, dict):
        raise UsageError(f"{where}: a prompt must be an object with 'box' and/or 'points', got {_shown(item)}")
    unknown = [key for key in item if key not in _PROMPT_KEYS]
    if unknown:
        # SAM's own API takes labels apart from the points; here they travel with each point
        hint = "; labels go as the third number of each point, [x, y, label]" if "labels" in unknown else ""
        raise UsageError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(a prompt has 'box' and/or 'points'){hint}")
    box = _box_from_json(item.get("box"), where)
    points = _points_from_json(item.get("points"), where)
    if box is None and not points:
        raise UsageError(f"{where}: a prompt needs at least one point or a box")
    return Prompt(tuple((x, y) for x, y, _ in points), tuple(label for *_, label in points), box)


def load_prompts_file(path: str | Path) -> dict[str, list[Prompt]] | list[Prompt]:
    """Read a JSON prompts file.

    Either a list of prompts applied to every image, or an object mapping image paths (as
    given, or bare file names) to their own lists. A prompt is ``{"box": [x0, y0, x1, y1],
    "points": [[x, y, label], ...]}`` with either key optional.

    Raises:
        SlimsegError: the file cannot be read (exit status 1).
        UsageError: its content is malformed; the message starts ``FILE[index]:`` or
            ``FILE[image][index]:`` (exit status 2, as for a malformed ``--box``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SlimsegError(f"{path}: cannot read prompts file ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: prompts file is not valid JSON ({error})") from None
    if isinstance(data, list):
        return [_prompt_from_json(item, f"{path}[{i}]") for i, item in enumerate(data)]
    if isinstance(data, dict):
        return {name: _image_prompts_from_json(items, f"{path}[{name}]") for name, items in data.items()}
    raise UsageError(f"{path}: prompts file must be a list of prompts or an object of image → prompts, "
                     f"got {_shown(data)}")


def _image_prompts_from_json(items: Any, where: str) -> list[Prompt]:
    if not isinstance(items, list):
        raise UsageError(f"{where}: must be a list of prompts, got {_shown(items)}")
    return [_prompt_from_json(item, f"{where}[{i}]") for i, item in enumerate(items)]


def fit_to_image(prompt: Prompt, height: int, width: int) -> Prompt:
    """Clip a box that sticks out of the image; refuse points outside it or a box fully outside."""
    for x, y in prompt.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise SlimsegError(f"point ({x:g}, {y:g}) lies outside the {width}x{height} image")
    box = prompt.box
    if box is not None:
        # float() because min/max hand back the int bound where the box is clipped
        clipped = (float(min(max(box[0], 0), width)), float(min(max(box[1], 0), height)),
                   float(min(max(box[2], 0), width)), float(min(max(box[3], 0), height)))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise SlimsegError(f"box {list(box)} lies outside the {width}x{height} image")
        box = clipped
    return Prompt(prompt.points, prompt.labels, box)


@dataclass(frozen=True)
class PromptResult:
    """Decoded masks of one prompt: (C, H, W) bool masks, (C,) predicted IoU."""

    prompt: Prompt
    masks: np.ndarray
    scores: np.ndarray


def predict_prompts(predictor: Predictor, prompts: Sequence[Prompt], multimask_output: bool) -> list[PromptResult]:
    """Decode every prompt against the predictor's current image, batched.

    Prompts with the same shape (number of points, box or not) share one decoder batch;
    padding unequal point lists would add tokens and change the masks, so it is not done.
    """
    predictor._require_image()
    groups: dict[tuple[int, bool], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault((len(prompt.points), prompt.box is not None), []).append(index)
    results: list[PromptResult | None] = [None] * len(prompts)
    size = predictor.original_size
    for (n_points, has_box), indexes in groups.items():
        coords = labels = boxes = None
        if n_points:
            raw = torch.tensor([prompts[i].points for i in indexes], dtype=torch.float, device=predictor.device)
            coords = predictor.transform.apply_coords_torch(raw, size)
            labels = torch.tensor([prompts[i].labels for i in indexes], dtype=torch.int, device=predictor.device)
        if has_box:
            raw = torch.tensor([prompts[i].box for i in indexes], dtype=torch.float, device=predictor.device)
            boxes = predictor.transform.apply_boxes_torch(raw, size)
        masks, scores, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=multimask_output)
        for row, index in enumerate(indexes):
            results[index] = PromptResult(prompts[index], masks[row].cpu().numpy(), scores[row].cpu().numpy())
    return [result for result in results if result is not None]
