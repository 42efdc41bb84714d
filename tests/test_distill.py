"""Aligning distillation: loss schedule, feature matching, resume, files, any encoder, DDP
(its refusals and skips: test_distill_refusals.py)."""

from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn

import slimseg
from conftest import tiny_config
from slimseg.compress.distill import DistillConfig, distill
from slimseg.compress.losses import match_features
from slimseg.compress.metrics import read_metrics
from slimseg.data.datasets import ImageFolderDataset, SA1BDataset
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import Sam, SamConfig

# lr 1e-3 rather than SlimSAM's 1e-4: a few tiny steps must visibly reduce the loss.
FAST = dict(batch_size=2, grad_accum=1, lr=1e-3, log_every=1)


def make_pair(student_config: SamConfig | None = None) -> tuple[Sam, Sam]:
    """A random tiny teacher and a student: a noisy copy of it, or a fresh model of ``student_config``."""
    torch.manual_seed(0)
    teacher = slimseg.build_model(tiny_config())
    with torch.no_grad():  # SAM initialises these to zero; random values make the features informative
        for name, parameter in teacher.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.normal_(0.0, 0.02)
    torch.manual_seed(1)
    if student_config is not None:
        return slimseg.build_model(student_config), teacher
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in student.image_encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return student, teacher


def tiny_options() -> dict:
    config = tiny_config()
    return dict(img_size=config.image_encoder.img_size, pixel_mean=config.pixel_mean, pixel_std=config.pixel_std)


def datasets(root: Path) -> tuple[ImageFolderDataset, SA1BDataset]:
    """Training images and the same images as an SA-1B validation set."""
    return ImageFolderDataset(root, **tiny_options()), SA1BDataset(root, **tiny_options())


def epoch_records(out_dir: Path) -> list[dict]:
    return [record for record in read_metrics(out_dir / "metrics.jsonl") if record["kind"] == "epoch"]


def encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    return slimseg.load_model(path, device="cpu").image_encoder.state_dict()


@pytest.fixture(scope="module")
def reference_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four uninterrupted epochs with validation (intermediate terms in epochs 1-2): run A."""
    torch.set_num_threads(2)
    out_dir = tmp_path_factory.mktemp("run_a")
    student, teacher = make_pair()
    train, val = datasets(data_root)
    distill(student, teacher, train, out_dir, DistillConfig(epochs=4, **FAST), val=val)
    return out_dir


def test_loss_decreases_and_intermediate_terms_stop_halfway(reference_run: Path) -> None:
    epochs = epoch_records(reference_run)
    assert [record["epoch"] for record in epochs] == [1, 2, 3, 4]
    embedding = [record["embedding_loss"] for record in epochs]
    assert all(later < earlier for earlier, later in zip(embedding, embedding[1:])), embedding
    assert embedding[-1] < 0.5 * embedding[0]
    assert all(0.0 <= record["val_miou"] <= 1.0 for record in epochs)

    steps = [record for record in read_metrics(reference_run / "metrics.jsonl") if record["kind"] == "step"]
    assert [record["step"] for record in steps] == list(range(1, 13))  # 3 batches of 2 per epoch
    for record in steps + epochs:
        if record["epoch"] <= 2:
            assert record["intermediate_loss"] > 0
            # SlimSAM's weighting: (1 - a)·embedding + a·intermediate with a = 0.5.
            expected = 0.5 * record["embedding_loss"] + 0.5 * record["intermediate_loss"]
            loss = record.get("loss", record.get("train_loss"))
            assert loss == pytest.approx(expected, rel=1e-5)
        else:
            assert record["intermediate_loss"] is None
            assert record.get("loss", record.get("train_loss")) == pytest.approx(record["embedding_loss"])
        assert record["lr"] == pytest.approx(1e-3)
    assert all(record["images_per_s"] > 0 for record in steps)


def test_output_files(reference_run: Path) -> None:
    state = torch.load(reference_run / "last.ckpt", weights_only=True)
    assert state["epoch"] == 4 and state["step"] == 12
    assert SamConfig.from_json(state["model_config"]) == tiny_config()
    assert isinstance(state["rng"]["python"], list) and isinstance(state["rng"]["numpy"], list)
    assert set(state) >= {"weights", "optimizer", "scheduler", "best_metric", "distill_config"}

    final = encoder_weights(reference_run / "final.safetensors")
    for name, tensor in state["weights"].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)
    best = slimseg.load_model(reference_run / "best.safetensors", device="cpu")
    assert best.config == tiny_config()
    improved = [record["epoch"] for record in epoch_records(reference_run) if record["improved"]]
    assert improved[0] == 1 and state["best_epoch"] == improved[-1]

    with Image.open(reference_run / "loss.png") as image:
        assert image.format == "PNG" and image.size == (800, 500)
        image.verify()
    for line in (reference_run / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)
    assert not list(reference_run.glob(".*.tmp"))  # no leftovers of the atomic writes


def test_resume_after_finished_epochs_matches_uninterrupted_run(
    reference_run: Path, data_root: Path, tmp_path: Path
) -> None:
    train, val = datasets(data_root)
    student, teacher = make_pair()
    first = DistillConfig(epochs=2, intermediate_epochs=2, **FAST)
    distill(student, teacher, train, tmp_path, first, val=val)
    student, teacher = make_pair()  # a new process would start from fresh objects too
    result = distill(student, teacher, train, tmp_path, DistillConfig(epochs=4, **FAST), val=val, resume=True)

    assert result.intermediate_epochs == 2  # the schedule stored in last.ckpt, not 4 // 2 of the new call
    assert_same_run(reference_run, tmp_path)
    assert [record["epoch"] for record in result.epochs] == [1, 2, 3, 4]


class KilledDataset(torch.utils.data.Dataset):
    """Wraps a dataset and raises once ``remaining`` reads are used up, after arming (a killed process)."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner, self.remaining = inner, None

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        if self.remaining is not None:
            if self.remaining == 0:
                raise KeyboardInterrupt
            self.remaining -= 1
        return self.inner[index]


def test_resume_after_a_crash_midway_matches_uninterrupted_run(
    reference_run: Path, data_root: Path, tmp_path: Path
) -> None:
    train, val = datasets(data_root)
    killed = KilledDataset(train)

    def arm(record: dict) -> None:
        if record["epoch"] == 1:
            killed.remaining = 3  # one optimizer step of epoch 2 completes, the second one dies

    student, teacher = make_pair()
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, killed, tmp_path, DistillConfig(epochs=4, **FAST), val=val, on_epoch_end=arm)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert (last["kind"], last["epoch"], last["step"]) == ("step", 2, 4)

    # The half-trained student object is reused: resume must overwrite its weights.
    distill(student, teacher, train, tmp_path, DistillConfig(epochs=4, **FAST), val=val, resume=True)
    assert_same_run(reference_run, tmp_path)
    steps = [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl") if record["kind"] == "step"]
    assert steps == list(range(1, 13))  # the interrupted epoch's records were replaced, not duplicated


def assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = epoch_records(expected_dir), epoch_records(actual_dir)
    assert [record["epoch"] for record in actual] == [1, 2, 3, 4]
    for key in ("train_loss", "embedding_loss", "val_miou", "lr"):
        torch.testing.assert_close(torch.tensor([r[key] for r in actual], dtype=torch.float64),
                                   torch.tensor([r[key] for r in expected], dtype=torch.float64),
                                   rtol=1e-12, atol=0)
    want, got = encoder_weights(expected_dir / "final.safetensors"), encoder_weights(actual_dir / "final.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_resume_errors(reference_run: Path, data_root: Path, tmp_path: Path) -> None:
    train, _ = datasets(data_root)
    student, teacher = make_pair()
    with pytest.raises(SlimsegError, match="nothing to resume in"):
        distill(student, teacher, train, tmp_path, DistillConfig(epochs=2, **FAST), resume=True)
    other, _ = make_pair(tiny_config(mlp_dim=48))
    with pytest.raises(SlimsegError, match="another architecture"):
        distill(other, teacher, train, reference_run, DistillConfig(epochs=5, **FAST), resume=True)
    with pytest.raises(SlimsegError, match="batch_size"):
        distill(student, teacher, train, reference_run, DistillConfig(epochs=5, **{**FAST, "batch_size": 3}),
                resume=True)


# q, k, v of every block, and the block output in place of the narrower MLP hidden features.
BLOCK_FALLBACK = [name for i in range(4) for name in (f"blocks.{i}.attn.q", f"blocks.{i}.attn.k",
                                                      f"blocks.{i}.attn.v", f"blocks.{i}")]


def test_feature_matching_follows_the_widths() -> None:
    teacher = slimseg.build_model(tiny_config()).image_encoder
    images = torch.zeros(1, 3, 256, 256)
    bottleneck = [f"blocks.{i}.{part}" for i in range(4) for part in ("attn.q", "attn.k", "attn.v", "mlp.act")]
    # Step-1 student: residual stream pruned, bottlenecks intact.
    step1 = slimseg.build_model(tiny_config(embed_dim=24, attn_dim=48, mlp_dim=96)).image_encoder
    assert [pair.name for pair in match_features(step1, teacher, images)] == bottleneck
    # Step-2 student: MLP pruned, so the MLP hidden features give way to the block outputs.
    narrow_mlp = slimseg.build_model(tiny_config(mlp_dim=48)).image_encoder
    assert [pair.name for pair in match_features(narrow_mlp, teacher, images)] == BLOCK_FALLBACK
    # Nothing but the embedding matches.
    different = slimseg.build_model(tiny_config(embed_dim=24, attn_dim=24, mlp_dim=48)).image_encoder
    assert match_features(different, teacher, images) == []


def test_narrower_student_uses_block_outputs_then_embedding_only(data_root: Path, tmp_path: Path) -> None:
    student, teacher = make_pair(tiny_config(mlp_dim=48))
    train, _ = datasets(data_root)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150)
    result = distill(student, teacher, train, tmp_path, DistillConfig(epochs=2, **FAST), console=console)
    shown = screen.getvalue()
    assert "intermediate terms for epochs 1-1: blocks.0.attn.q" in shown
    assert "epoch 2/2" in shown and "step 3/3" in shown and "img/s" in shown
    assert result.intermediate_terms == BLOCK_FALLBACK
    assert result.metric == "train_loss" and result.best_epoch is not None
    first, second = result.epochs
    assert first["intermediate_loss"] > 0 and second["intermediate_loss"] is None
    assert first["val_miou"] is None


class ConvEncoder(nn.Module):
    """A non-ViT encoder: (B, 3, 256, 256) → (B, 256, 16, 16) with two strided convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, 256, 4, stride=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_any_encoder_module_with_amp(data_root: Path, tmp_path: Path) -> None:
    _, teacher = make_pair()
    student = Sam(tiny_config(), image_encoder=ConvEncoder())
    decoder_before = copy.deepcopy(student.mask_decoder.state_dict())
    train, _ = datasets(data_root)
    result = distill(student, teacher, train, tmp_path, DistillConfig(epochs=2, amp=True, **FAST))
    assert result.intermediate_terms == []
    assert all(record["intermediate_loss"] is None for record in result.epochs)
    assert result.epochs[1]["train_loss"] < result.epochs[0]["train_loss"]
    for name, tensor in student.mask_decoder.state_dict().items():  # only the encoder trains
        assert torch.equal(tensor, decoder_before[name])


DDP_SCRIPT = """
import copy, sys
from pathlib import Path
import torch
import slimseg
from slimseg.compress.distill import DistillConfig, distill, init_distributed_from_env
from slimseg.data.datasets import ImageFolderDataset
from slimseg.modeling.sam import sam_vit_config

rank, world = init_distributed_from_env()
assert world == 2, world
torch.set_num_threads(1)
config = sam_vit_config(embed_dim=48, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=8,
                        img_size=256, mlp_dim=96)
torch.manual_seed(0)
teacher = slimseg.build_model(config)
torch.manual_seed(1)
student = copy.deepcopy(teacher)
with torch.no_grad():
    for parameter in student.image_encoder.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.05)
train = ImageFolderDataset(sys.argv[1], img_size=256, pixel_mean=config.pixel_mean, pixel_std=config.pixel_std)
result = distill(student, teacher, train, Path(sys.argv[2]),
                 DistillConfig(epochs=2, batch_size=2, grad_accum=1, lr=1e-3, log_every=1))
print(f"rank {rank} done: {[round(r['train_loss'], 6) for r in result.epochs]}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(data_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_distill.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out_dir = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(data_root),
         str(out_dir)],
        capture_output=True, text=True, timeout=240, env=environment,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "rank 0 done" in completed.stdout and "rank 1 done" in completed.stdout
    records = read_metrics(out_dir / "metrics.jsonl")
    epochs = [record for record in records if record["kind"] == "epoch"]
    steps = [record["step"] for record in records if record["kind"] == "step"]
    assert [record["epoch"] for record in epochs] == [1, 2]  # rank 0 alone writes
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 4  # 3 images per rank: 2 batches
    assert epochs[0]["images"] == 6
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert slimseg.load_model(out_dir / "final.safetensors", device="cpu").config.image_encoder.embed_dim == 48


def test_a_used_folder_and_changed_settings_are_refused(reference_run: Path, data_root: Path, tmp_path: Path) -> None:
    train, val = datasets(data_root)
    untouched = {path.name: path.read_bytes() for path in reference_run.iterdir()}
    student, teacher = make_pair()
    with pytest.raises(SlimsegError, match=r"folder is not empty \(it holds a run \(last.ckpt\)\); give resume=True"):
        distill(student, teacher, train, reference_run, DistillConfig(epochs=4, **FAST), val=val)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SlimsegError, match="notes.txt"):
        distill(student, teacher, train, tmp_path, DistillConfig(epochs=1, **FAST))
    changed = DistillConfig(epochs=5, **{**FAST, "lr": 1e-2}, intermediate_epochs=3)
    with pytest.raises(SlimsegError, match="lr was 0.001 there, now 0.01; .*intermediate_epochs was 2 there, now 3"):
        distill(student, teacher, train, reference_run, changed, val=val, resume=True)
    other_teacher = make_pair()[1]
    with torch.no_grad():
        other_teacher.image_encoder.neck[0].weight.mul_(1.01)
    with pytest.raises(SlimsegError, match="the teacher's weights .* differ from the ones the run started with"):
        distill(student, other_teacher, train, reference_run, DistillConfig(epochs=5, **FAST), val=val, resume=True)
    assert {path.name: path.read_bytes() for path in reference_run.iterdir()} == untouched
