"""COCO as it ships: ``ROOT/<split>/*.jpg`` and ``ROOT/annotations/instances_<split>.json``.

Every problem with the layout, the annotation file or a detections results file is a
``SlimsegError`` whose one line names the file and the reason, raised before any model work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from slimseg.data.images import read_image
from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.masks import decode_rle
from slimseg.validation import is_finite_number

__all__ = ["CocoSplit", "annotation_mask", "load_coco_split", "load_detections", "read_coco_image"]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "bbox")
_DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


@dataclass
class CocoSplit:
    """One split of a COCO-layout folder.

    ``images`` keeps the annotation file's order (``--limit N`` takes the first N);
    ``annotations`` maps an image id to its annotations (crowd regions included), each
    with ``iscrowd`` and ``area`` filled in when the file left them out.
    """

    root: Path
    split: str
    image_dir: Path
    annotation_file: Path
    images: list[dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]
    _by_id: dict[int, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {image["id"]: image for image in self.images}

    def image(self, image_id: int) -> dict:
        return self._by_id[image_id]

    def image_path(self, image: dict) -> Path:
        return self.image_dir / image["file_name"]

    def select(self, limit: int | None = None) -> list[dict]:
        """The first ``limit`` images (all without a limit), checked to exist on disk."""
        if limit is not None and limit < 1:
            raise UsageError(f"--limit {limit}: must be a positive number of images")
        chosen = self.images if limit is None else self.images[:limit]
        missing = [image["file_name"] for image in chosen if not self.image_path(image).is_file()]
        if missing:
            raise SlimsegError(f"{self.image_dir}: {len(missing)} of {len(chosen)} image file(s) listed in "
                               f"{self.annotation_file.name} are missing (first: {missing[0]})")
        for image in chosen:
            self._check_size(image)
        return chosen

    def _check_size(self, image: dict) -> None:
        """The file's size (from its header, stored or EXIF-rotated) must be the annotated one,
        or the masks would not fit its pixels; ``read_coco_image`` would only find out mid-run."""
        path = self.image_path(image)
        try:
            with Image.open(path) as raw:
                width, height = raw.size
                rotated = raw.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except (OSError, SyntaxError, ValueError) as error:
            raise SlimsegError(f"{path}: cannot read image ({error})") from None
        sizes = {(width, height), (height, width)} if rotated else {(width, height)}
        if (image["width"], image["height"]) not in sizes:
            raise SlimsegError(f"{path}: image is {width}x{height} but {self.annotation_file.name} says "
                               f"{image['width']}x{image['height']} (image {image['id']})")

    def ground_truth(self, image_ids: Iterable[int]) -> dict:
        """A COCO ground-truth dict limited to ``image_ids``, with copies of the annotations
        (pycocotools rewrites segmentations in place while it evaluates)."""
        ids = list(image_ids)
        annotations = [dict(a) for image_id in ids for a in self.annotations.get(image_id, [])]
        return {"images": [dict(self._by_id[i]) for i in ids], "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}


def _not_a_folder(path: Path, kind: str) -> str:
    """Why ``path`` cannot be read as a ``kind`` ("folder", "image folder"): a file given
    there is a different mistake from a missing folder."""
    if not path.exists():
        return f"no such {kind}"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"is a file, not {article} {kind}" if path.is_file() else f"exists but is not {article} {kind}"


def _layout_hint(root: Path, split: str) -> str:
    return f"expected COCO layout {root}/{split}/*.jpg and {root}/annotations/instances_{split}.json"


def load_coco_split(root: str | Path, split: str) -> CocoSplit:
    """Read and check the layout and the annotation file of ``split`` under ``root``.

    Raises:
        UsageError: ``split`` is not a plain folder name.
        SlimsegError: a folder or the annotation file is missing, or the file is not
            valid COCO instances JSON.
    """
    root = Path(root)
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise UsageError(f"--split {split!r}: give a split name such as val2017")
    if not root.is_dir():
        raise SlimsegError(f"{root}: {_not_a_folder(root, 'folder')} ({_layout_hint(root, split)})")
    image_dir = root / split
    if not image_dir.is_dir():
        raise SlimsegError(f"{image_dir}: {_not_a_folder(image_dir, 'image folder')} ({_layout_hint(root, split)})")
    annotation_file = root / "annotations" / f"instances_{split}.json"
    if not annotation_file.is_file():
        raise SlimsegError(f"{annotation_file}: no such annotation file ({_layout_hint(root, split)})")
    data = _read_json(annotation_file)
    if not isinstance(data, dict):
        raise SlimsegError(f"{annotation_file}: not a COCO instances file (the top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SlimsegError(f"{annotation_file}: not a COCO instances file (no '{key}' list)")
    if not data["images"]:
        raise SlimsegError(f"{annotation_file}: lists no images (the 'images' list is empty)")
    images = [_checked_image(annotation_file, image) for image in data["images"]]
    category_ids = _category_ids(annotation_file, data["categories"])
    known: dict[int, dict] = {}
    for image in images:
        # a repeated id would pair annotations with the wrong image's size, and pycocotools
        # keeps only one of them: say so rather than fail later on a size mismatch
        if image["id"] in known:
            raise SlimsegError(f"{annotation_file}: image id {image['id']} appears more than once in 'images'")
        known[image["id"]] = image
    annotations: dict[int, list[dict]] = {image_id: [] for image_id in known}
    annotation_ids: set = set()
    for raw in data["annotations"]:
        annotation = _checked(annotation_file, "annotation", raw, _ANNOTATION_KEYS)
        # pycocotools indexes annotations by id: a repeated one silently drops an instance
        key = annotation["id"] if isinstance(annotation["id"], Hashable) else repr(annotation["id"])
        if key in annotation_ids:
            raise SlimsegError(f"{annotation_file}: annotation id {annotation['id']!r} appears more than once in "
                               "'annotations'")
        annotation_ids.add(key)
        image = known.get(_whole_id(annotation["image_id"]))
        if image is None:
            raise SlimsegError(f"{annotation_file}: annotation {annotation['id']} refers to image "
                               f"{annotation['image_id']}, which is not in 'images'")
        _check_annotation_fields(annotation_file, annotation, image, category_ids)
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            annotation["area"] = float(annotation_mask(annotation, image["height"], image["width"]).sum())
        annotations[annotation["image_id"]].append(annotation)
    return CocoSplit(root=root, split=split, image_dir=image_dir, annotation_file=annotation_file, images=images,
                     annotations=annotations, categories=list(data["categories"]))


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO annotation: polygons, uncompressed RLE (crowd) or compressed RLE."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), bool)
        # A polygon needs three points; COCO has a few degenerate ones that pycocotools rejects.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return decode_rle(rle)
    return decode_rle(segmentation)


def load_detections(path: str | Path, split: CocoSplit) -> dict[int, list[dict]]:
    """A COCO detection results file (a JSON list of {image_id, category_id, bbox [x, y, w, h],
    score}, as ViTDet or Detectron2 write it), grouped by image id, highest score first.

    Raises:
        SlimsegError: unreadable, not such a list, or naming an image or category that is
            not in the split's annotation file.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimsegError(f"--detections {path}: no such file")
    data = _read_json(path)
    if not isinstance(data, list):
        raise SlimsegError(f"--detections {path}: not a COCO results file (expected a JSON list of detections)")
    image_ids = {image["id"] for image in split.images}
    category_ids = {category["id"] for category in split.categories}
    grouped: dict[int, list[dict]] = {}
    for index, detection in enumerate(data):
        if not isinstance(detection, dict) or any(key not in detection for key in _DETECTION_KEYS):
            raise SlimsegError(f"--detections {path}: entry {index} lacks one of {', '.join(_DETECTION_KEYS)}")
        bbox = detection["bbox"]
        if not _is_box(bbox):
            raise SlimsegError(f"--detections {path}: entry {index} has bbox {bbox!r}, expected [x, y, w, h] "
                               "with w, h >= 0")
        if _whole_id(detection["image_id"]) not in image_ids:
            raise SlimsegError(f"--detections {path}: entry {index} names image_id {detection['image_id']!r}, "
                               f"which is not in {split.annotation_file.name}")
        if _whole_id(detection["category_id"]) not in category_ids:
            raise SlimsegError(f"--detections {path}: entry {index} names category_id "
                               f"{detection['category_id']!r}, which is not in {split.annotation_file.name}")
        if not is_finite_number(detection["score"]):
            raise SlimsegError(f"--detections {path}: entry {index} has score {detection['score']!r}, "
                               "expected a number")
        grouped.setdefault(detection["image_id"], []).append(
            {"category_id": detection["category_id"], "bbox": [float(v) for v in bbox],
             "score": float(detection["score"])})
    for detections in grouped.values():
        detections.sort(key=lambda d: -d["score"])
    return grouped


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SlimsegError(f"{path}: cannot read ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SlimsegError(f"{path}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg})") from None


def _checked(path: Path, kind: str, entry: Any, keys: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict):
        raise SlimsegError(f"{path}: an entry of '{kind}s' is not an object")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise SlimsegError(f"{path}: {kind} {entry.get('id', '?')} has no {', '.join(repr(k) for k in missing)}")
    return dict(entry)


def _whole_id(value: Any) -> int | None:
    """An id as COCO writes it, a whole number; None for anything else (a list would not hash)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """``value`` as a positive whole number (640 or 640.0), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value != int(value) or value < 1:
        return None
    return int(value)


def _checked_image(path: Path, entry: Any) -> dict:
    """An entry of 'images' with every field the evaluation reads of the right type."""
    image = _checked(path, "image", entry, _IMAGE_KEYS)
    name = f"{path}: image {image['id']!r}"
    if _whole_id(image["id"]) is None:
        raise SlimsegError(f"{name} has id {image['id']!r}, expected a whole number")
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise SlimsegError(f"{name} has file_name {image['file_name']!r}, expected a file name")
    for key in ("height", "width"):
        size = _count(image[key])
        if size is None:
            raise SlimsegError(f"{name} has {key} {image[key]!r}, expected a positive whole number")
        image[key] = size
    return image


def _category_ids(path: Path, categories: list) -> set[int]:
    """The ids of the 'categories' entries, each a whole number."""
    ids = set()
    for category in categories:
        category_id = _whole_id(category.get("id")) if isinstance(category, dict) else None
        if category_id is None:
            raise SlimsegError(f"{path}: category {category!r} has no whole-number 'id'")
        ids.add(category_id)
    return ids


def _check_annotation_fields(path: Path, annotation: dict, image: dict, category_ids: set[int]) -> None:
    """Types and shapes of what scoring reads, so a bad file fails at load, not mid-run.
    ``category_ids``: those of 'categories'; an empty list of categories (class-agnostic
    ground truth) lets any whole-number category_id through."""
    name = f"{path}: annotation {annotation['id']!r}"
    category_id = _whole_id(annotation["category_id"])
    if category_id is None or (category_ids and category_id not in category_ids):
        raise SlimsegError(f"{name} has category_id {annotation['category_id']!r}, expected the id of an "
                           "entry of 'categories'")
    bbox = annotation["bbox"]
    if not _is_box(bbox):
        raise SlimsegError(f"{name} has bbox {bbox!r}, expected [x, y, w, h] with w, h >= 0")
    if "area" in annotation and not (is_finite_number(annotation["area"]) and annotation["area"] >= 0):
        raise SlimsegError(f"{name} has area {annotation['area']!r}, expected a number >= 0")
    if annotation.get("iscrowd", 0) not in (0, 1):
        raise SlimsegError(f"{name} has iscrowd {annotation['iscrowd']!r}, expected 0 or 1")
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        if not all(isinstance(p, list) and all(is_finite_number(v) for v in p) for p in segmentation):
            raise SlimsegError(f"{name} has a segmentation polygon that is not a list of numbers")
        return
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise SlimsegError(f"{name} has a segmentation that is neither polygons nor RLE (size, counts)")
    size = segmentation["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_count(v) is not None for v in size)):
        raise SlimsegError(f"{name} has RLE size {size!r}, expected [height, width]")
    if [int(v) for v in size] != [image["height"], image["width"]]:
        raise SlimsegError(f"{name} has RLE size {size!r} but its image {image['id']!r} is "
                           f"{image['height']}x{image['width']} (height x width)")
    if not isinstance(segmentation["counts"], (str, list)):
        raise SlimsegError(f"{name} has RLE counts of type {type(segmentation['counts']).__name__}, "
                           "expected a string or a list")


def _is_box(value: Any) -> bool:
    """Whether ``value`` is a COCO box [x, y, w, h] of finite numbers with w, h >= 0."""
    return isinstance(value, list) and len(value) == 4 and all(is_finite_number(v) for v in value) and min(value[2:]) >= 0


def read_coco_image(split: CocoSplit, image: dict) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of ``image``, in the frame its annotations use.

    ``read_image`` applies EXIF orientation; should that disagree with the height and width
    in the annotation file, the stored (unrotated) pixels are what was annotated.
    """
    path = split.image_path(image)
    rgb = read_image(path)
    expected = (int(image["height"]), int(image["width"]))
    if rgb.shape[:2] == expected:
        return rgb
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))
    if stored.shape[:2] == expected:
        return np.ascontiguousarray(stored)
    raise SlimsegError(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]} but {split.annotation_file.name} says "
                       f"{expected[1]}x{expected[0]}")
