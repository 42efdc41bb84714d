"""``slimseg prune`` and ``slimseg distill`` end to end on a tiny model and a generated SA-1B folder,
and ``alternate_slimming`` (what ``slimseg prune`` runs) from Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.compress.distill_config import DistillConfig
from slimseg.compress.slimming import SlimmingPlan, alternate_slimming
from slimseg.data.datasets import ImageFolderDataset
from slimseg.data.synthetic import write_sa1b_folder
from slimseg.errors import SlimsegError
from slimseg.modeling.lite_sam import LiteSam
from test_train import tiny_lite_sam_config

runner = CliRunner()


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return slimseg.save_model(random_tiny_model(3), tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture(scope="module")
def sa1b(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    write_sa1b_folder(root, 4, size=(96, 128), seed=1)
    return root


def test_prune_both_stages_with_distillation_then_segment(teacher_path, sa1b, tmp_path):
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", "--model", str(teacher_path), "--ratio", "0.5", "--data", str(sa1b),
                                 "--out", str(out), "--grad-images", "2", "--distill-epochs", "1",
                                 "--val", str(sa1b), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embed_dim"] == 24
    assert {(b["qk_dim"], b["mlp_dim"]) for b in summary["blocks"]} == {(24, 48)}
    # the tiny encoder is mostly its 256-channel neck, which pruning keeps
    assert summary["after"]["parameters"]["image_encoder"] < summary["before"]["parameters"]["image_encoder"] - 80_000
    model = slimseg.load_model(out, device="cpu")
    assert model.config.image_encoder.embed_dim == 24
    for run in ("1-bottleneck-aligning", "2-embedding-aligning"):
        assert (tmp_path / "pruned.work" / run / "loss.png").is_file()
    image = sorted(sa1b.glob("*.jpg"))[0]
    segmented = runner.invoke(app, ["segment", str(image), "-m", str(out), "-b", "5,5,60,60"])
    assert segmented.exit_code == 0, segmented.output


def test_prune_only_global_bottleneck_gives_multiples_of_heads(teacher_path, sa1b, tmp_path):
    out = tmp_path / "global.safetensors"
    result = runner.invoke(app, ["prune", "-m", str(teacher_path), "--ratio", "0.5", "--data", str(sa1b), "--out",
                                 str(out), "--stage", "bottleneck", "--mode", "global", "--importance", "magnitude",
                                 "--distill-epochs", "0"])
    assert result.exit_code == 0, result.output
    blocks = json.loads(result.stdout)["blocks"]
    assert all(b["qk_dim"] % 4 == 0 and b["mlp_dim"] % 4 == 0 for b in blocks)
    assert json.loads(result.stdout)["embed_dim"] == 48


def test_distill_and_resume_from_the_command_line(teacher_path, sa1b, tmp_path):
    student = tmp_path / "student.safetensors"
    runner.invoke(app, ["prune", "-m", str(teacher_path), "--ratio", "0.5", "--data", str(sa1b), "--out",
                        str(student), "--stage", "embedding", "--importance", "magnitude", "--distill-epochs", "0"])
    common = ["distill", "--student", str(student), "--teacher", str(teacher_path), "--data", str(sa1b),
              "--out", str(tmp_path / "run"), "--align", "bottleneck", "--batch-size", "2", "--grad-accum", "1",
              "--lr", "1e-3"]
    first = runner.invoke(app, common + ["--epochs", "1"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, common + ["--epochs", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    assert json.loads(resumed.stdout)["final"].endswith("final.safetensors")
    assert slimseg.load_model(tmp_path / "run" / "final.safetensors", device="cpu").config.image_encoder.embed_dim == 24
    assert Image.open(tmp_path / "run" / "loss.png").text["YLabel"] == "loss (MSE)"
    files = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (tmp_path / "run").iterdir()}
    # fewer epochs than the run has done: refused (exit 2) before any model is read
    fewer = runner.invoke(app, common + ["--epochs", "1", "--resume", "--offline"])
    assert fewer.exit_code == 2, fewer.output
    assert "--epochs 1: the run has reached epoch 2; give --epochs 2 or more" in fewer.stderr
    # the same epochs as a finished run: nothing to do, and no file is rewritten
    again = runner.invoke(app, common + ["--epochs", "2", "--resume"])
    assert again.exit_code == 0, again.output
    assert "already done its 2 epoch(s); nothing to train" in again.stderr
    assert json.loads(again.stdout)["best_epoch"] == json.loads(resumed.stdout)["best_epoch"]
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (tmp_path / "run").iterdir()} == files


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "x.pth"], ".safetensors", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "OUT", "--mode", "sideways"], "--mode", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "OUT", "--importance", "vibes"], "--importance", 2),
        (["prune", "--ratio", "0.5", "--data", "NOWHERE", "--out", "OUT"], "nowhere: no such folder", 1),
        (["distill", "--student", "STUDENT", "--data", "DATA", "--out", "RUN", "--resume"], "nothing to resume", 1),
        (["distill", "--student", "STUDENT", "--data", "DATA", "--out", "RUN", "--align", "x"], "--align", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "DIRSAFE"], "is a folder: give a file name", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "UNDERFILE"], "is a file, not a folder", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "OUT", "--importance", "taylor"],
         "--importance taylor needs a student that differs from its teacher", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "OUT", "--model", "LITE"], "pruning needs a SAM", 2),
        (["distill", "--student", "STUDENT", "--data", "DATA", "--out", "FILE"], "is a file: give a folder", 2),
        (["distill", "--student", "STUDENT", "--data", "DATA", "--out", "DATA"], "--resume", 2),
        # a ratio the widths cannot reach is a usage error that names the highest one
        (["prune", "--ratio", "0.92", "--data", "DATA", "--out", "OUT"],
         "leaves no channels of the 48-wide embedding width, so the highest reachable ratio is 0.9166", 2),
        (["prune", "--ratio", "0.92", "--data", "DATA", "--out", "OUT", "--stage", "bottleneck", "--mode", "global"],
         "so the highest reachable ratio is 0.9166", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "OUT", "--importance", "l1"],
         "--importance 'l1': choose one of disturbed-taylor, magnitude, random", 2),
        (["prune", "--ratio", "0.5", "--data", "DATA", "--out", "WORKFILE"], "needs the work folder", 2),
        (["prune", "--ratio", "0.5", "--data", "CORRUPT", "--out", "OUT"], "prune: data", 1),
    ],
)
def test_bad_compression_input_gives_one_line(teacher_path, sa1b, tmp_path, args, fragment, code):
    replacements = {"DATA": str(sa1b), "OUT": str(tmp_path / "o.safetensors"), "NOWHERE": str(tmp_path / "nowhere"),
                    "STUDENT": str(teacher_path), "RUN": str(tmp_path / "run")}
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file.txt").write_text("notes")
    replacements.update({"DIRSAFE": str(tmp_path / "dir.safetensors"), "FILE": str(tmp_path / "file.txt"),
                         "UNDERFILE": str(tmp_path / "file.txt" / "x.safetensors")})
    if "WORKFILE" in args:  # a file where --out r/p.safetensors keeps its distillation runs (r/p.work)
        (tmp_path / "w.work").write_text("notes")
        replacements["WORKFILE"] = str(tmp_path / "w.safetensors")
    if "CORRUPT" in args:
        (tmp_path / "corrupt").mkdir()
        (tmp_path / "corrupt" / "a.jpg").write_bytes(b"not a jpeg")
        replacements["CORRUPT"] = str(tmp_path / "corrupt")
    if "LITE" in args:
        replacements["LITE"] = str(slimseg.save_model(LiteSam(tiny_lite_sam_config()), tmp_path / "lite.safetensors"))
    before = sorted(p.name for p in sa1b.iterdir())
    args = [replacements.get(a, a) for a in args]
    if args[0] == "prune":
        args += [] if "--model" in args else ["--model", str(teacher_path)]
    else:
        args += ["--teacher", str(teacher_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert "sigma" not in result.stderr and "internal error" not in result.stderr
    assert ("distill:" not in result.stderr) if args[0] == "prune" else True
    assert " taylor," not in result.stderr  # only the values --importance accepts are listed
    assert sorted(p.name for p in sa1b.iterdir()) == before  # nothing written into --data
    assert not (tmp_path / "o.work").exists()  # refused before any pruning step


def test_distill_refuses_to_overwrite_a_finished_run(teacher_path, sa1b, tmp_path):
    common = ["distill", "--student", str(teacher_path), "--teacher", str(teacher_path), "--data", str(sa1b),
              "--out", str(tmp_path / "run"), "--batch-size", "2", "--grad-accum", "1", "--epochs", "1"]
    assert runner.invoke(app, common).exit_code == 0
    finished = (tmp_path / "run" / "last.ckpt").read_bytes()
    again = runner.invoke(app, common)
    assert again.exit_code == 2, again.output
    assert "last.ckpt" in again.stderr and "--resume" in again.stderr
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == finished


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"ratio": float("nan")}, r"pruning ratio must be a finite number in \[0, 1\), got nan"),
    ({"ratio": "0.5"}, r"pruning ratio must be a finite number in \[0, 1\), got '0.5'"),
    ({"ratio": 1.0}, r"pruning ratio must be in \[0, 1\), got 1.0"),
    ({"ratio": 0.93, "mode": "global", "stage": "bottleneck"}, "highest reachable ratio is"),
    ({"ratio": 0.95, "stage": "embedding"}, "leaves no channels"),
    ({"mode": "glob"}, "unknown pruning mode 'glob'"),
    ({"stage": "heads"}, "unknown stage 'heads'"),
    ({"importance": "l2"}, "unknown importance 'l2'"),
    ({"grad_images": 0}, "grad_images must be an integer >= 1"),
    ({"distill_epochs": -1}, "distill_epochs must be an integer >= 0"),
    ({"distill": DistillConfig(lr=float("inf"))}, "lr must be a finite number"),
])
def test_slimming_plan_is_checked_before_the_gradient_pass(sa1b, tmp_path, changes, fragment):
    steps: list[str] = []
    plan = SlimmingPlan(**{"ratio": 0.5, "grad_images": 2, "distill_epochs": 1, **changes})
    with pytest.raises(SlimsegError, match=fragment):
        alternate_slimming(random_tiny_model(3), ImageFolderDataset(sa1b, img_size=256), plan, tmp_path / "work",
                           torch.device("cpu"), on_step=steps.append)
    assert steps == [] and not (tmp_path / "work").exists()


def test_slimming_data_of_another_size_is_refused_before_the_gradient_pass(sa1b, tmp_path):
    steps: list[str] = []
    with pytest.raises(SlimsegError, match="build the dataset with img_size=256"):
        alternate_slimming(random_tiny_model(3), ImageFolderDataset(sa1b, img_size=128),
                           SlimmingPlan(ratio=0.5, grad_images=2, distill_epochs=0), tmp_path, torch.device("cpu"),
                           on_step=steps.append)
    assert steps == []


def test_random_importance_follows_the_plan_seed_not_the_global_rng(sa1b):
    def pruned(global_seed: int, plan_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # whatever a notebook did before
        plan = SlimmingPlan(ratio=0.5, mode="global", importance="random", distill_epochs=0,
                            distill=DistillConfig(seed=plan_seed))
        return alternate_slimming(random_tiny_model(3), ImageFolderDataset(sa1b, img_size=256), plan,
                                  Path("unused"), torch.device("cpu")).model.image_encoder.state_dict()

    first, second, other = pruned(1, 5), pruned(2, 5), pruned(1, 6)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].shape != other[k].shape or not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("command", ["prune", "distill", "train"])
@pytest.mark.parametrize("option", ["--data", "--val"])
@pytest.mark.parametrize("problem", ["missing", "file"])
def test_data_folders_are_checked_before_any_model_is_read(sa1b, tmp_path, monkeypatch, command, option, problem):
    # sam-b is not cached here and --offline forbids the download: reading it would fail first
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path / "cache"))
    bad = tmp_path / "nodir"
    if problem == "file":
        bad.write_text("notes")
    folders = {"--data": str(sa1b), "--val": str(sa1b), option: str(bad)}
    args = {"prune": ["prune", "--model", "sam-b", "--ratio", "0.5", "--out", str(tmp_path / "p.safetensors")],
            "distill": ["distill", "--student", "sam-b", "--teacher", "sam-b", "--out", str(tmp_path / "run")],
            "train": ["train", "--model", "sam-b", "--out", str(tmp_path / "run")]}[command]
    result = runner.invoke(app, [*args, *[x for pair in folders.items() for x in pair], "--offline"])
    assert result.exit_code == 1, result.output
    reason = "no such folder" if problem == "missing" else "is a file, not a folder"
    assert result.stderr.strip().splitlines() == [f"slimseg: error: {option} {bad}: {reason}"]


@pytest.mark.parametrize("command", ["distill", "train"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_last_ckpt_is_named_in_one_short_line(teacher_path, sa1b, tmp_path, command, damage):
    run = tmp_path / "run"
    run.mkdir()
    if damage == "garbage":
        (run / "last.ckpt").write_text("garbage\n")
    else:
        torch.save({"version": 1, "weights": torch.zeros(10_000)}, run / "whole.ckpt")
        data = (run / "whole.ckpt").read_bytes()
        (run / "last.ckpt").write_bytes(data[: len(data) // 2])
        (run / "whole.ckpt").unlink()
    args = (["distill", "--student", str(teacher_path), "--teacher", str(teacher_path)] if command == "distill"
            else ["train", "--model", str(teacher_path)])
    result = runner.invoke(app, [*args, "--data", str(sa1b), "--out", str(run), "--resume"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"slimseg: error: {run / 'last.ckpt'}: the checkpoint is corrupt or truncated "
                     "(not a readable slimseg last.ckpt)"]
