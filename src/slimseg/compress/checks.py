"""Checks that compression runs make before any expensive work.

A gradient pass or a training epoch can take hours on real data, so everything that can be
known up front (argument types, the run folder, whether the data can be read, has
annotations and has the model's input size) is checked here first, with one-line
``SlimsegError`` messages instead of the tensor or loader errors that would come later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from slimseg.errors import SlimsegError, UsageError

__all__ = ["check_annotated", "check_image_size", "check_run_folder", "first_item"]


def check_run_folder(out: Path, resume: bool, out_name: str = "out_dir", resume_name: str = "resume=True") -> None:
    """A fresh run must not overwrite a finished or started one (last.ckpt, metrics.jsonl,
    best.safetensors ...) nor write into a folder of other files, such as the images it
    would then train on. ``out_name`` and ``resume_name`` say how the caller spells them."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out_name} {out} is a file: give a folder")
    if resume or not out.is_dir():
        return
    present = sorted(entry.name for entry in out.iterdir())
    if present:
        what = "a run (last.ckpt)" if "last.ckpt" in present else f"{len(present)} file(s), e.g. {present[0]}"
        raise UsageError(f"{out_name} {out}: folder is not empty (it holds {what}); give {resume_name} to continue "
                         "a run, or an empty or new folder")


def _describe(dataset: Dataset, name: str) -> str:
    root = getattr(dataset, "root", None)
    return f"{name} ({root})" if root is not None else name


def first_item(dataset: Dataset, name: str, annotated: bool = False, limit: int | None = None) -> dict[str, Any]:
    """The first readable item of ``dataset`` (among its first ``limit``), with at least one
    annotated object when ``annotated``; raises when there is none.

    A dataset with ``annotation_count`` (``SA1BDataset``) is screened from its JSON files
    without reading images, so a folder of empty annotation lists fails at once.
    """
    try:
        size = len(dataset)
    except TypeError:
        raise SlimsegError(f"{name} must be a dataset with a length, got a {type(dataset).__name__}") from None
    if size == 0:
        raise SlimsegError(f"{_describe(dataset, name)} is empty")
    counter = getattr(dataset, "annotation_count", None)
    for index in range(size if limit is None else min(limit, size)):
        if annotated and counter is not None and counter(index) == 0:
            continue
        item = dataset[index]
        if item is None:
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), torch.Tensor):
            raise SlimsegError(f"{name}: items must be dicts with an 'image' tensor (as ImageFolderDataset gives), "
                               f"got {type(item).__name__}")
        if annotated and "annotations" not in item:
            raise SlimsegError(f"{_describe(dataset, name)}: needs SA-1B masks (an SA1BDataset), but this "
                               f"{type(dataset).__name__} gives images without annotations")
        if not annotated or item["annotations"]:
            return item
    within = "" if limit is None or limit >= size else f" among its first {limit} items"
    wanted = "readable image with an annotated object (a mask with a point prompt)" if annotated else "readable image"
    raise SlimsegError(f"{_describe(dataset, name)}: no {wanted}{within}")


def check_annotated(dataset: Dataset, name: str, limit: int | None = None) -> dict[str, Any]:
    """The first readable annotated item: a training or validation set on SA-1B masks must
    have one, or the run would learn nothing (loss 0) or fail after its first epoch."""
    return first_item(dataset, name, annotated=True, limit=limit)


def check_image_size(item: dict[str, Any], name: str, img_size: int, key: str = "image",
                     option: str = "img_size", model: str = "the model") -> None:
    """Refuse items preprocessed at another size than ``model`` takes (a raw shape error later)."""
    height, width = item[key].shape[-2:]
    if (height, width) != (img_size, img_size):
        raise SlimsegError(f"{name}: gives {height}x{width} px inputs but {model} takes {img_size} px; "
                           f"build the dataset with {option}={img_size}")
