"""Lite-SAM and AutoPPN training: distillation from a teacher of another input size, end-to-end
mask supervision, AutoPPN on SA-1B annotations (also attached to a SAM), from Python and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.compress.distill import DistillConfig, distill
from slimseg.compress.objectives import match_embedding_size
from slimseg.compress.supervised import low_res_targets, mask_loss
from slimseg.compress.train import train, with_autoppn
from slimseg.data.datasets import ImageFolderDataset, SA1BDataset, collate_images
from slimseg.data.synthetic import write_sa1b_folder
from slimseg.errors import SlimsegError, UsageError
from slimseg.evaluation.proposal_recall import points_in_masks, proposal_recall
from slimseg.modeling.autoppn import AutoPPNConfig
from slimseg.modeling.lite_sam import LiteSam, LiteSamConfig
from slimseg.modeling.litevit import LiteViTConfig
from slimseg.modeling.sam import SamConfig
from slimseg.modeling.sam.config import MaskDecoderConfig

runner = CliRunner()


def tiny_lite_sam_config() -> LiteSamConfig:
    """A Lite-SAM at 128 px (8x8 embedding) with one block per stage and a one-layer decoder."""
    return LiteSamConfig(
        litevit=LiteViTConfig(dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), mlp_ratios=(2.0, 1.0, 1.0, 1.0),
                              neck_width=16, img_size=128),
        autoppn=AutoPPNConfig(width=16, depth=1),
        mask_decoder=MaskDecoderConfig(transformer_mlp_dim=128, transformer_depth=1),
    )


def fast(epochs: int, lr: float = 1e-3) -> DistillConfig:
    return DistillConfig(epochs=epochs, batch_size=2, grad_accum=1, lr=lr, log_every=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    write_sa1b_folder(root / "train", 6, size=(96, 128), seed=1)
    write_sa1b_folder(root / "val", 4, size=(96, 128), seed=2)
    return root / "train", root / "val"


def test_teacher_embedding_is_resized_to_the_student_grid() -> None:
    ramp = torch.linspace(0, 1, 64).expand(1, 2, 64, 64)
    resized = match_embedding_size(ramp, torch.zeros(1, 2, 40, 40))
    assert resized.shape == (1, 2, 40, 40)
    assert torch.all(resized[..., 1:] > resized[..., :-1])  # the ramp keeps its direction
    assert match_embedding_size(ramp, torch.zeros(1, 2, 64, 64)) is ramp
    with pytest.raises(SlimsegError, match="channels must agree"):
        match_embedding_size(ramp, torch.zeros(1, 3, 40, 40))


def test_dataset_gives_each_image_at_both_input_sizes(folders) -> None:
    dataset = ImageFolderDataset(folders[0], img_size=128, teacher_img_size=256)
    batch = collate_images([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 128, 128) and batch["teacher_image"].shape == (2, 3, 256, 256)
    torch.testing.assert_close(batch["teacher_image"][0], dataset.preprocess(
        slimseg.data.images.read_image(dataset.paths[0]), 256)[0])
    assert "teacher_image" not in ImageFolderDataset(folders[0], img_size=128, teacher_img_size=128)[0]


def test_lite_sam_encoder_distils_from_a_teacher_at_another_input_size(folders, tmp_path) -> None:
    torch.manual_seed(0)
    student, teacher = LiteSam(tiny_lite_sam_config()), random_tiny_model(0)  # 128 px and 256 px
    decoder_before = {k: v.clone() for k, v in student.mask_decoder.state_dict().items()}
    data = ImageFolderDataset(folders[0], img_size=128, teacher_img_size=256)
    result = distill(student, teacher, data, tmp_path, fast(3))
    losses = [record["train_loss"] for record in result.epochs]
    assert losses[-1] < losses[0]
    assert result.intermediate_terms == []
    for name, tensor in student.mask_decoder.state_dict().items():  # only the encoder learns
        torch.testing.assert_close(tensor, decoder_before[name], rtol=0, atol=0)
    assert slimseg.load_model(tmp_path / "final.safetensors", device="cpu").config == tiny_lite_sam_config()


def test_mask_targets_follow_the_image_resize_and_padding() -> None:
    mask = np.zeros((96, 128), dtype=bool)
    mask[:, :64] = True  # the left half of a landscape image
    target = low_res_targets([mask], img_size=128, size=(32, 32), device=torch.device("cpu"))[0]
    # 128x96 resizes to 128x96 in a 128² input (padding below row 96 → low-res row 24)
    assert target[:24, :16].all() and not target[:24, 16:].any() and not target[24:].any()
    perfect = torch.where(target.bool(), 20.0, -20.0)[None, None]
    assert float(mask_loss(perfect, target[None])) < 1e-3
    assert float(mask_loss(-perfect, target[None])) > 1.0


def test_end_to_end_mask_training_lowers_every_term_and_resumes(folders, tmp_path) -> None:
    torch.manual_seed(0)
    model = LiteSam(tiny_lite_sam_config())
    data, val = SA1BDataset(folders[0], img_size=128), SA1BDataset(folders[1], img_size=128)
    trained, result = train(model, data, tmp_path, fast(3), stage="masks", val=val, max_masks=4)
    assert trained is model and result.metric == "val_miou"
    first, last = result.epochs[0], result.epochs[-1]
    assert last["train_loss"] < first["train_loss"] and last["mask_loss"] < first["mask_loss"]
    assert all(record["heatmap_loss"] > 0 and record["iou_loss"] >= 0 for record in result.epochs)
    assert 0.0 <= last["val_miou"] <= 1.0
    _, resumed = train(LiteSam(tiny_lite_sam_config()), data, tmp_path, fast(4), stage="masks", val=val,
                       max_masks=4, resume=True)
    assert [record["epoch"] for record in resumed.epochs] == [1, 2, 3, 4]
    with pytest.raises(SlimsegError, match="holds a masks run, not an autoppn run"):
        train(LiteSam(tiny_lite_sam_config()), data, tmp_path, fast(5), stage="autoppn", val=val, resume=True)
    with pytest.raises(UsageError, match="with epochs 2: the run has reached epoch 4; give epochs 4 or more"):
        train(LiteSam(tiny_lite_sam_config()), data, tmp_path, fast(2), stage="masks", val=val, max_masks=4,
              resume=True)
    # the y axis says what was optimised: SAM's mask losses and, with an AutoPPN, its heatmap loss
    assert Image.open(tmp_path / "loss.png").text["YLabel"] == "loss (20 x focal + dice + IoU MSE + AutoPPN focal)"


def test_autoppn_learns_to_find_held_out_objects(folders, tmp_path) -> None:
    torch.manual_seed(0)
    model = LiteSam(tiny_lite_sam_config())
    encoder_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    data, val = SA1BDataset(folders[0], img_size=128), SA1BDataset(folders[1], img_size=128)
    _, result = train(model, data, tmp_path, fast(12, lr=1e-2), stage="autoppn", val=val)
    assert result.metric == "val_recall"
    losses = [record["train_loss"] for record in result.epochs]
    assert losses[-1] < 0.7 * losses[0]
    assert {"small_loss", "medium_loss", "large_loss"} <= set(result.epochs[0])
    for name, tensor in model.image_encoder.state_dict().items():  # the encoder stays frozen
        torch.testing.assert_close(tensor, encoder_before[name], rtol=0, atol=0)
    recall = proposal_recall(model, val)
    assert recall.objects >= 8 and recall.proposals <= model.autoppn.config.top_k
    assert recall.recall >= 0.75 and recall.recall > recall.random_recall


def test_a_sam_gets_an_autoppn_that_segevery_uses(folders, tmp_path) -> None:
    sam = random_tiny_model(1)
    extended = with_autoppn(sam)
    assert extended.config.autoppn is not None and extended.autoppn is not None
    torch.testing.assert_close(extended.image_encoder.state_dict()["patch_embed.proj.weight"],
                               sam.image_encoder.state_dict()["patch_embed.proj.weight"])
    assert SamConfig.from_json(extended.config.to_json()) == extended.config
    assert "autoppn" not in json.loads(sam.config.to_json())  # configs without AutoPPN are unchanged

    trained, result = train(sam, SA1BDataset(folders[0], img_size=256), tmp_path, fast(3), stage="autoppn")
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    loaded = slimseg.load_model(tmp_path / "final.safetensors", device="cpu")
    assert loaded.autoppn is not None
    image = slimseg.data.images.read_image(sorted(folders[1].glob("*.jpg"))[0])
    generator = slimseg.MaskGenerator(loaded, sampler="autoppn", pred_iou_thresh=0, stability_score_thresh=0)
    records = generator.generate(image)
    assert generator.last_timings["proposer"] > 0 and isinstance(records, list)


def test_points_in_masks() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    assert points_in_masks(np.array([[3.0, 3.0]]), [mask, ~mask]).tolist() == [True, False]
    assert points_in_masks(np.zeros((0, 2)), [mask]).tolist() == [False]
    with pytest.raises(SlimsegError, match="needs a model with an AutoPPN"):
        proposal_recall(random_tiny_model(0), None)


def test_train_from_the_command_line(folders, tmp_path) -> None:
    model = slimseg.save_model(LiteSam(tiny_lite_sam_config()), tmp_path / "lite.safetensors")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "-m", str(model), "--stage", "autoppn", "--data", str(folders[0]),
                                 "--val", str(folders[1]), "--out", str(out), "--epochs", "1", "--batch-size", "2",
                                 "--grad-accum", "1", "--lr", "0.01", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["metric"] == "val_recall" and summary["autoppn"] is True
    assert (out / "final.safetensors").is_file() and (out / "loss.png").is_file()
    # recall is reported beside its chance level: as many random points, and how many that is
    (record,) = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert 0 <= record["val_random_recall"] <= 1 and record["val_proposals"] > 0
    epoch_line = next(line for line in result.stderr.splitlines() if line.startswith("epoch 1/1"))
    assert f"val_random_recall {record['val_random_recall']:.4g}" in epoch_line
    assert f"val_proposals {record['val_proposals']:.4g}" in epoch_line
    assert Image.open(out / "loss.png").text["YLabel"] == "loss (AutoPPN focal, per size group)"


@pytest.mark.parametrize(("args", "fragment", "code"), [
    (["--stage", "heads"], "--stage 'heads': choose one of masks, autoppn", 2),
    (["--data", "{missing}"], "no such folder", 1),
    (["--data", "{plain}"], "not SA-1B layout", 1),
    (["--resume"], "last.ckpt", 1),
    (["--resume", "-m", "lite-sam"], "last.ckpt", 1),  # and no "random initialisation" line
    (["--out", "{file}"], "is a file: give a folder", 2),
    (["--out", "{file}/run"], "is a file, not a folder", 2),
    (["--out", "{plain}"], "not empty", 2),
    (["--data", "{empty}"], "--data", 1),
    (["--val", "{empty}"], "--val", 1),
    (["--val", "{empty}", "--stage", "autoppn"], "no image has an annotated object", 1),
])
def test_bad_training_input_gives_one_line(folders, tmp_path, args, fragment, code) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    slimseg.io.write_image_png(plain / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "file.txt").write_text("notes")
    empty = tmp_path / "empty"
    write_sa1b_folder(empty, 2, size=(96, 128), seed=3)
    for labels in empty.glob("*.json"):
        labels.write_text(json.dumps({**json.loads(labels.read_text()), "annotations": []}))
    model = slimseg.save_model(LiteSam(tiny_lite_sam_config()), tmp_path / "lite.safetensors")
    base = {"-m": str(model), "--data": str(folders[0]), "--out": str(tmp_path / "run"), "--device": "cpu"}
    options = [a.format(missing=tmp_path / "missing", plain=plain, file=tmp_path / "file.txt", empty=empty)
               for a in args]
    for flag, value in base.items():
        if flag not in options:
            options += [flag, value]
    result = runner.invoke(app, ["train", *options])
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "run" / "final.safetensors").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any epoch
    assert sorted(p.name for p in plain.iterdir()) == ["a.png"]


def test_mask_training_repeats_exactly_with_the_same_seed(folders, tmp_path) -> None:
    model_path = slimseg.save_model(LiteSam(tiny_lite_sam_config()), tmp_path / "lite.safetensors")
    data = SA1BDataset(folders[0], img_size=128)

    def losses(run: str, seed: int) -> list[float]:
        config = DistillConfig(epochs=1, batch_size=2, grad_accum=1, lr=1e-3, log_every=1, seed=seed)
        train(slimseg.load_model(model_path, device="cpu"), data, tmp_path / run, config, stage="masks", max_masks=1)
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["mask_loss"] for r in records if r["kind"] == "step"]

    torch.manual_seed(1)  # whatever the global random state, --seed alone decides
    first = losses("a", seed=5)
    torch.manual_seed(2)
    assert losses("b", seed=5) == first


def test_unusable_training_or_validation_data_is_refused_before_any_epoch(folders, tmp_path) -> None:
    unannotated = tmp_path / "unannotated"
    write_sa1b_folder(unannotated, 2, size=(96, 128), seed=3, objects=0)
    good = SA1BDataset(folders[0], img_size=128)
    cases = [  # (stage, data, val, message)
        ("masks", SA1BDataset(unannotated, img_size=128), None, "train: data .* no readable image with an annotated"),
        ("autoppn", SA1BDataset(unannotated, img_size=128), None, "no readable image with an annotated object"),
        ("masks", ImageFolderDataset(folders[0], img_size=128), None, "needs SA-1B masks .* ImageFolderDataset"),
        ("masks", SA1BDataset(folders[0], img_size=256), None, "build the dataset with img_size=128"),
        ("autoppn", [], None, "train: data is empty"),
        ("masks", good, SA1BDataset(unannotated, img_size=128), "train: val .* no readable image with an annotated"),
        ("autoppn", good, ImageFolderDataset(folders[1], img_size=128), "train: val .* needs SA-1B masks"),
        ("autoppn", good, SA1BDataset(folders[1], img_size=256), "train: val: .* img_size=128"),
    ]
    for stage, data, val, fragment in cases:
        with pytest.raises(SlimsegError, match=fragment):
            train(LiteSam(tiny_lite_sam_config()), data, tmp_path / "run", fast(1), stage=stage, val=val)
        assert not (tmp_path / "run").exists(), fragment


def test_resume_refuses_other_settings_and_another_frozen_base(folders, tmp_path) -> None:
    data = SA1BDataset(folders[0], img_size=128)
    torch.manual_seed(0)
    base = LiteSam(tiny_lite_sam_config())
    train(copy.deepcopy(base), data, tmp_path / "autoppn", fast(1), stage="autoppn")
    with pytest.raises(SlimsegError, match="not empty .*give resume=True"):
        train(copy.deepcopy(base), data, tmp_path / "autoppn", fast(1), stage="autoppn")
    with pytest.raises(SlimsegError, match="settings differ from the run's .*lr was 0.001 there, now 0.01"):
        train(copy.deepcopy(base), data, tmp_path / "autoppn", fast(2, lr=1e-2), stage="autoppn", resume=True)
    torch.manual_seed(1)
    with pytest.raises(SlimsegError, match="the model's weights outside its AutoPPN differ"):
        train(LiteSam(tiny_lite_sam_config()), data, tmp_path / "autoppn", fast(2), stage="autoppn", resume=True)
    train(copy.deepcopy(base), data, tmp_path / "masks", fast(1), stage="masks", max_masks=1)
    with pytest.raises(SlimsegError, match="max_masks was 1 there, now 2"):
        train(copy.deepcopy(base), data, tmp_path / "masks", fast(2), stage="masks", max_masks=2, resume=True)
