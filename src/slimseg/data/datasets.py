"""Datasets for distillation: image folders (no labels) and SA-1B folders (point-prompt validation).

Items hold the encoder input exactly as ``Sam.preprocess`` builds it, so a training loop
can feed ``batch["image"]`` straight to both the teacher's and the student's image encoders.
A bad file makes its item ``None`` (with one warning) instead of stopping a long run;
``collate_images`` drops those items.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from slimseg.data.images import IMAGE_EXTENSIONS, read_image
from slimseg.errors import SlimsegError
from slimseg.inference.masks import decode_rle
from slimseg.inference.transforms import ResizeLongestSide
from slimseg.modeling.sam.config import SAM_PIXEL_MEAN, SAM_PIXEL_STD

__all__ = ["Annotation", "ImageFolderDataset", "SA1BDataset", "collate_images"]

logger = logging.getLogger("slimseg.data")


@dataclass(frozen=True)
class Annotation:
    """One SA-1B mask with the point prompt that produced it.

    ``mask_rle`` is COCO RLE ``{"size": [H, W], "counts": ...}`` at the original image size;
    ``point`` is (x, y) and ``bbox_xywh`` is (x, y, w, h), both in original-image pixels.
    """

    mask_rle: dict
    point: tuple[float, float]
    bbox_xywh: tuple[float, float, float, float]

    def decode(self) -> np.ndarray:
        """The (H, W) bool mask."""
        return decode_rle(self.mask_rle)


class ImageFolderDataset(Dataset):
    """The images of a folder, resized, normalised and padded for a SAM image encoder.

    Each item is a dict, or ``None`` when the image cannot be read:
        ``"image"``: float32 (3, img_size, img_size); ``"path"``: str;
        ``"original_size"``: (H, W) of the file; ``"input_size"``: (h, w) after resizing.
    """

    def __init__(
        self,
        root: str | Path,
        img_size: int = 1024,
        pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
        pixel_std: Sequence[float] = SAM_PIXEL_STD,
        limit: int | None = None,
        recursive: bool = False,
        teacher_img_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        if img_size <= 0:
            raise SlimsegError(f"img_size must be positive, got {img_size}")
        if teacher_img_size is not None and teacher_img_size <= 0:
            raise SlimsegError(f"teacher_img_size must be positive, got {teacher_img_size}")
        # A teacher with another input size (distilling a 640 px student from SAM at 1024 px)
        # gets its own copy of each image, preprocessed at its size.
        self.teacher_img_size = teacher_img_size if teacher_img_size != img_size else None
        if limit is not None and limit <= 0:
            raise SlimsegError(f"limit must be positive, got {limit}")
        self.img_size = img_size
        self.transform = ResizeLongestSide(img_size)
        self._mean = _channel_tensor(pixel_mean, "pixel_mean")
        self._std = _channel_tensor(pixel_std, "pixel_std")
        if bool((self._std == 0).any()):
            raise SlimsegError(f"pixel_std must not contain zeros, got {tuple(pixel_std)}")
        if not self.root.exists():
            raise SlimsegError(f"{root}: no such folder")
        if not self.root.is_dir():
            raise SlimsegError(f"{root}: is not a folder")
        found = _list_images(self.root, recursive)
        if not found:
            raise SlimsegError(f"{root}: no image files {_where(self.root, recursive)}")
        selected = self._select(found)
        self.paths: list[Path] = selected[:limit] if limit is not None else selected
        # Paths already warned about; a training run revisits every file each epoch.
        self._warned: set[Path] = set()

    def _select(self, paths: list[Path]) -> list[Path]:
        """Hook for subclasses to keep only some images (before ``limit`` applies)."""
        return paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.paths[index]
        try:
            rgb = read_image(path)
        except SlimsegError as exc:
            self._warn_once(path, f"skipping image: {exc}")
            return None
        image, input_size = self.preprocess(rgb)
        item = {
            "image": image,
            "path": str(path),
            "original_size": (int(rgb.shape[0]), int(rgb.shape[1])),
            "input_size": input_size,
        }
        if self.teacher_img_size is not None:
            item["teacher_image"] = self.preprocess(rgb, self.teacher_img_size)[0]
        return item

    def preprocess(self, rgb: np.ndarray, size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """HxWx3 uint8 RGB → ((3, S, S) float32 encoder input, (h, w) resized size), with S
        ``size`` or the dataset's ``img_size``.

        Same arithmetic as ``Sam.preprocess`` on ``ResizeLongestSide(S).apply_image(rgb)``,
        so the result matches the model's own bit for bit.
        """
        size = self.img_size if size is None else size
        transform = self.transform if size == self.img_size else ResizeLongestSide(size)
        resized = transform.apply_image(rgb)
        pixels = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
        normalised = (pixels - self._mean) / self._std
        height, width = int(resized.shape[0]), int(resized.shape[1])
        padded = F.pad(normalised, (0, size - width, 0, size - height))
        return padded, (height, width)

    def _warn_once(self, key: Path, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning("%s", _one_line(message))


class SA1BDataset(ImageFolderDataset):
    """The images of an SA-1B folder that have a sibling ``<stem>.json``, with their masks.

    Items add ``"annotations"``: list[:class:`Annotation`] and ``"skipped_annotations"``: the
    number of masks left out because they carry no ``point_coords``. An item is ``None``
    when its image or its JSON cannot be read or is malformed.
    """

    def _select(self, paths: list[Path]) -> list[Path]:
        kept = [path for path in paths if path.with_suffix(".json").is_file()]
        if not kept:
            raise SlimsegError(
                f"{self.root}: not SA-1B layout (no image has a sibling <name>.json annotation file)"
            )
        if len(kept) < len(paths):
            # One line for the folder, as a bad JSON gets one per file: a shard with thousands
            # of unlabelled images must not print thousands of lines.
            unlabelled = next(path for path in paths if not path.with_suffix(".json").is_file())
            logger.warning("%s", _one_line(
                f"{self.root}: leaving out {len(paths) - len(kept)} of {len(paths)} images that have no sibling "
                f"<name>.json annotation file (e.g. {unlabelled.name})"))
        return kept

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = super().__getitem__(index)
        if item is None:
            return None
        json_path = Path(item["path"]).with_suffix(".json")
        try:
            annotations, skipped = read_sa1b_annotations(json_path, item["original_size"])
        except SlimsegError as exc:
            self._warn_once(json_path, f"skipping image {item['path']}: {exc}")
            return None
        item["annotations"] = annotations
        item["skipped_annotations"] = skipped
        return item

    def annotation_count(self, index: int) -> int:
        """Masks with a point prompt listed in the JSON of image ``index`` (0 when it cannot be
        read): a quick check that a folder has anything to learn from, without the images."""
        try:
            records = _annotation_records(self.paths[index].with_suffix(".json"))
        except SlimsegError:
            return 0
        return sum(1 for record in records if isinstance(record, dict) and _has_point_prompt(record))


def read_sa1b_annotations(path: Path, image_size: tuple[int, int]) -> tuple[list[Annotation], int]:
    """Parse an SA-1B JSON file.

    Args:
        path: the ``sa_<id>.json`` file.
        image_size: (H, W) of its image; every mask must have this size.

    Returns:
        The annotations that have a point prompt, and how many were skipped for lacking one.

    Raises:
        SlimsegError: the file is missing, not JSON, or not in SA-1B's schema.
    """
    records = _annotation_records(path)
    annotations: list[Annotation] = []
    skipped = 0
    for number, record in enumerate(records):
        try:
            annotation = _parse_annotation(record, image_size)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            reason = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise SlimsegError(f"{path}: annotation {number} is malformed ({reason})") from None
        if annotation is None:
            skipped += 1
        else:
            annotations.append(annotation)
    return annotations, skipped


def _annotation_records(path: Path) -> list:
    """The 'annotations' list of an SA-1B JSON file; SlimsegError when it cannot be read."""
    try:
        with path.open("r", encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise SlimsegError(f"{path}: annotation file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlimsegError(f"{path}: cannot read annotation file ({exc})") from None
    records = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise SlimsegError(f"{path}: not an SA-1B annotation file (no 'annotations' list)")
    return records


def _has_point_prompt(record: dict) -> bool:
    return bool(record.get("point_coords"))


def _parse_annotation(record: dict, image_size: tuple[int, int]) -> Annotation | None:
    segmentation = record["segmentation"]
    if not isinstance(segmentation, dict):
        # COCO polygons (a list of coordinate lists) would need the mask rasterised at an
        # unknown resolution; SA-1B itself always stores RLE.
        shape = "a polygon list" if isinstance(segmentation, list) else f"a {type(segmentation).__name__}"
        raise ValueError(f"segmentation is {shape}, but it must be COCO RLE {{size, counts}}: "
                         "polygons are not supported")
    size = [int(value) for value in segmentation["size"]]
    counts = segmentation["counts"]
    if not isinstance(counts, (str, list)):
        raise TypeError(f"segmentation counts must be a string or a list, got {type(counts).__name__}")
    if tuple(size) != tuple(image_size):
        raise ValueError(f"mask size {size} differs from the image size {list(image_size)}")
    bbox = tuple(float(value) for value in record["bbox"])
    if len(bbox) != 4:
        raise ValueError(f"bbox must have 4 numbers, got {len(bbox)}")
    if not _has_point_prompt(record):
        return None
    x, y = (float(value) for value in record["point_coords"][0])
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"point ({x}, {y}) is not finite")
    return Annotation(mask_rle={"size": size, "counts": counts}, point=(x, y), bbox_xywh=bbox)


def collate_images(items: list[dict | None]) -> dict | None:
    """Batch dataset items for a ``DataLoader``; ``None`` items (unreadable files) are dropped.

    Returns:
        ``"image"`` (and ``"teacher_image"``) stacked to (B, 3, S, S), every other key as a list of B values, or
        ``None`` when no item is left (the caller skips the batch).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    keys = list(kept[0])
    for item in kept[1:]:
        if item.keys() != kept[0].keys():
            # datasets of different kinds mixed (ConcatDataset of an image folder and SA-1B, say)
            differing = sorted(kept[0].keys() ^ item.keys())
            raise SlimsegError(f"cannot batch {kept[0].get('path', 'an item')} with {item.get('path', 'an item')}: "
                               f"only one of them has {', '.join(differing)} (mixed kinds of dataset?)")
    batch: dict[str, Any] = {key: [item[key] for item in kept] for key in keys}
    for key in ("image", "teacher_image"):
        if key in batch:
            batch[key] = torch.stack(batch[key])
    return batch


def _list_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under root, sorted by relative path; hidden files and folders are skipped."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        # Pruning in place stops os.walk from descending into hidden folders.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")] if recursive else []
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(folder) / name
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def _where(root: Path, recursive: bool) -> str:
    """Where no image was found, with a hint when the images are likely one level down (a
    folder of SA-1B shards): only the folder itself is searched."""
    if recursive:
        return "in it or its subfolders"
    try:
        subfolders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    except OSError:
        subfolders = []
    if not subfolders:
        return "in it"
    return (f"in it (its {len(subfolders)} sub-folder(s), e.g. {subfolders[0]}, are not searched: "
            "give one of them, or a folder that holds the images themselves)")


def _channel_tensor(values: Sequence[float], name: str) -> torch.Tensor:
    """(3,) per-channel constants → a float32 (3, 1, 1) tensor, as ``Sam`` stores them."""
    numbers = tuple(float(value) for value in values)
    if len(numbers) != 3:
        raise SlimsegError(f"{name} must have 3 values (R, G, B), got {len(numbers)}")
    return torch.tensor(numbers).view(-1, 1, 1)


def _one_line(text: str) -> str:
    return " ".join(text.split())
