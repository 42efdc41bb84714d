"""Distillation's refusals and skips: bad settings, unusable data refused before any epoch,
an item unlike the first refused when it comes, a corrupt image skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_distill import FAST, datasets, make_pair, tiny_options

from slimseg.compress.distill import DistillConfig, distill
from slimseg.data.datasets import ImageFolderDataset, SA1BDataset
from slimseg.data.synthetic import write_sa1b_folder
from slimseg.errors import SlimsegError


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"epochs": 1.5}, "epochs must be an integer >= 1, got 1.5"),
    ({"epochs": "2"}, "epochs must be an integer >= 1, got '2'"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"intermediate_epochs": 0.5}, "intermediate_epochs must be an integer"),
    ({"intermediate_weight": float("nan")}, "intermediate_weight must be a finite number"),
])
def test_config_needs_integers_and_finite_numbers(changes, fragment) -> None:
    with pytest.raises(SlimsegError, match=fragment):
        DistillConfig(**changes).validate()


def test_unusable_data_is_refused_before_any_epoch(data_root: Path, tmp_path: Path) -> None:
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for index in range(2):
        (unreadable / f"x{index}.jpg").write_bytes(b"not a jpeg")
    unannotated = tmp_path / "unannotated"
    write_sa1b_folder(unannotated, 2, size=(96, 128), seed=3, objects=0)
    train, val = datasets(data_root)
    small = dict(tiny_options(), img_size=128)
    cases = [  # (student config, train, val, intermediate weight, message)
        (None, ImageFolderDataset(unreadable, **tiny_options()), None, 0.5, "no readable image"),
        (None, ImageFolderDataset(unreadable, **tiny_options()), None, 0.0, "no readable image"),
        (None, [], None, 0.5, "distill: train is empty"),
        (None, ImageFolderDataset(data_root, **small), None, 0.5, "build the dataset with img_size=256"),
        (tiny_config(img_size=128), ImageFolderDataset(data_root, **small), None, 0.5,
         "the teacher takes 256 px .* teacher_img_size=256"),
        (None, train, SA1BDataset(unannotated, **tiny_options()), 0.5, "no readable image with an annotated object"),
        (None, train, train, 0.5, "needs SA-1B masks .* ImageFolderDataset"),
    ]
    for student_config, data, validation, weight, fragment in cases:
        student, teacher = make_pair(student_config)
        out_dir = tmp_path / "run"
        with pytest.raises(SlimsegError, match=fragment):
            distill(student, teacher, data, out_dir, DistillConfig(epochs=1, intermediate_weight=weight, **FAST),
                    val=validation)
        assert not out_dir.exists(), fragment


def test_corrupt_image_is_skipped_with_one_warning(data_root: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for path in sorted(data_root.glob("*.jpg"))[:3]:
        (root / path.name).write_bytes(path.read_bytes())
    (root / "sa_0_broken.jpg").write_bytes(b"not a jpeg at all")
    student, teacher = make_pair()
    train = ImageFolderDataset(root, **tiny_options())
    assert len(train) == 4
    with caplog.at_level(logging.WARNING, logger="slimseg.data"):
        # batch 1: the broken file is a batch of its own, which collates to None
        result = distill(student, teacher, train, tmp_path / "out",
                         DistillConfig(epochs=2, batch_size=1, grad_accum=2, lr=1e-3, log_every=1))
    warnings = [record for record in caplog.records if "sa_0_broken" in record.getMessage()]
    assert len(warnings) == 1
    assert [record["images"] for record in result.epochs] == [3, 3]
    assert (tmp_path / "out" / "final.safetensors").is_file()


class UnlikeTheFirst(torch.utils.data.Dataset):
    """``base``'s items, those after the first changed by ``change`` (the first is what
    distill checks before the run)."""

    def __init__(self, base: ImageFolderDataset, change) -> None:
        self.base, self.change = base, change

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        if index > 0:
            self.change(item)
        return item


@pytest.mark.parametrize(("student_size", "change", "fragment"), [
    (128, lambda item: item.pop("teacher_image"), "sa_2.jpg has no teacher_image though the first item has one"),
    (128, lambda item: item.update(image=torch.zeros(3, 64, 64)),
     "sa_2.jpg gives 64x64 px image inputs but the student takes 128 px"),
    (256, lambda item: item.update(image=torch.zeros(3, 128, 128)),
     "sa_2.jpg gives 128x128 px image inputs but the student takes 256 px"),
], ids=["no-teacher-image", "smaller-image", "smaller-image-same-size-teacher"])
def test_an_item_unlike_the_first_is_refused_naming_its_file(data_root: Path, tmp_path: Path, student_size,
                                                              change, fragment) -> None:
    student, teacher = make_pair(tiny_config(img_size=student_size))
    teacher_size = {} if student_size == 256 else {"teacher_img_size": 256}
    base = ImageFolderDataset(data_root, **dict(tiny_options(), img_size=student_size), **teacher_size, limit=3)
    with pytest.raises(SlimsegError, match=fragment):
        distill(student, teacher, UnlikeTheFirst(base, change), tmp_path / "run",
                DistillConfig(epochs=1, batch_size=1, grad_accum=1, intermediate_weight=0.0))
