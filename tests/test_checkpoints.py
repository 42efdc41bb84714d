"""Loading segment-anything state dicts and slimseg safetensors; refusing bad files."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, tiny_config
from reference import randomise, reference_sam
from safetensors.torch import save_file

import slimseg
from slimseg.errors import SlimsegError
from slimseg.zoo.checkpoint import read_checkpoint
from slimseg.zoo.sam_layout import fuse_qkv, split_fused_qkv


@pytest.fixture(scope="module")
def reference_and_checkpoint(tmp_path_factory):
    reference = reference_sam(tiny_config())
    state = randomise(reference, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(state, path)
    return reference, state, path


def test_segment_anything_checkpoint_loads_and_matches(reference_and_checkpoint):
    from segment_anything import SamPredictor

    reference, _, path = reference_and_checkpoint
    model = slimseg.load_model(path, device="cpu")
    assert model.config == tiny_config()
    assert "image_encoder.blocks.0.attn.q.weight" in model.state_dict()
    image = photo(300, 200, seed=4)
    theirs, ours = SamPredictor(reference), slimseg.Predictor(model)
    with torch.no_grad():
        theirs.set_image(image)
    ours.set_image(image)
    for kwargs in (dict(point_coords=np.array([[50.0, 60.0]]), point_labels=np.array([1])),
                   dict(box=np.array([10.0, 20.0, 150.0, 250.0]), multimask_output=False)):
        their_logits, their_iou, _ = theirs.predict(**kwargs, return_logits=True)
        our_logits, our_iou, _ = ours.predict(**kwargs, return_logits=True)
        np.testing.assert_allclose(our_logits, their_logits, atol=1e-4 * np.abs(their_logits).max())
        np.testing.assert_allclose(our_iou, their_iou, atol=1e-5)


def test_split_then_fuse_is_identity(reference_and_checkpoint):
    _, state, _ = reference_and_checkpoint
    round_trip = fuse_qkv(split_fused_qkv(state))
    assert round_trip.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(round_trip[key], state[key], rtol=0, atol=0)


def test_nested_state_dict_and_split_qkv_are_accepted(reference_and_checkpoint, tmp_path):
    _, state, _ = reference_and_checkpoint
    path = tmp_path / "nested.pth"
    torch.save({"model": split_fused_qkv(state)}, path)
    assert read_checkpoint(path).config == tiny_config()


def test_sam_layout_safetensors_without_metadata_load(reference_and_checkpoint, tmp_path):
    _, state, _ = reference_and_checkpoint
    path = tmp_path / "weights.bin"  # the name says nothing; the content decides
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "segment-anything" and checkpoint.config == tiny_config()


def test_native_round_trip_is_detected_from_content(reference_and_checkpoint, tmp_path):
    _, _, path = reference_and_checkpoint
    model = slimseg.load_model(path, device="cpu")
    saved = slimseg.save_model(model, tmp_path / "model.safetensors")
    renamed = tmp_path / "model.pth"
    shutil.copy(saved, renamed)
    assert read_checkpoint(renamed).format == "slimseg"
    reloaded = slimseg.load_model(renamed, device="cpu")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], tensor, rtol=0, atol=0)


class _CreatesFile:
    """Unpickling this object creates ``path``: proof, if the file appears, that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("error::UserWarning")  # nothing from torch reaches the user's stderr
def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _CreatesFile(marker)}, path)
    pickle.loads(pickle.dumps(_CreatesFile(tmp_path / "control"))).close()
    assert (tmp_path / "control").exists()  # the payload really does run when unpickled normally
    with pytest.raises(SlimsegError, match="holds no model tensors"):
        slimseg.load_model(path, device="cpu")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_CreatesFile(marker)))
    with pytest.raises(SlimsegError, match="plain.pkl"):
        slimseg.load_model(plain, device="cpu")
    assert not marker.exists()


def test_truncated_and_garbage_files_give_one_line(reference_and_checkpoint, tmp_path):
    _, _, path = reference_and_checkpoint
    data = path.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "empty.pth": b"",
        "text.pth": b"hello, I am not a checkpoint\n",
    }
    model = slimseg.load_model(path, device="cpu")
    native = slimseg.save_model(model, tmp_path / "native.safetensors").read_bytes()
    cases["truncated.safetensors"] = native[: len(native) // 2]
    for name, content in cases.items():
        target = tmp_path / name
        target.write_bytes(content)
        with pytest.raises(SlimsegError) as caught:
            slimseg.load_model(target, device="cpu")
        message = str(caught.value)
        assert str(target) in message and "\n" not in message, message


def test_weights_that_do_not_fit_name_the_keys(reference_and_checkpoint, tmp_path):
    _, state, _ = reference_and_checkpoint
    broken = dict(state)
    broken.pop("mask_decoder.output_upscaling.0.bias")
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    with pytest.raises(SlimsegError, match="missing: mask_decoder.output_upscaling.0.bias"):
        slimseg.load_model(path, device="cpu")
    extra = dict(state, **{"mask_decoder.extra.weight": torch.zeros(2)})
    torch.save(extra, path)
    with pytest.raises(SlimsegError, match="unexpected: mask_decoder.extra.weight"):
        slimseg.load_model(path, device="cpu")


def test_unknown_names_and_missing_files():
    with pytest.raises(SlimsegError, match="neither a registered model name nor an existing checkpoint"):
        slimseg.load_model("sam-z", device="cpu")
    with pytest.raises(SlimsegError, match="unknown model 'sam-z'"):
        slimseg.build_model("sam-z")


def test_registered_model_missing_from_cache_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path))
    monkeypatch.setenv("SLIMSEG_OFFLINE", "1")
    with pytest.raises(SlimsegError, match=f"fetch https://.*sam_vit_b_01ec64.pth and save it as {tmp_path}"):
        slimseg.load_model("sam-b", device="cpu")


def test_registered_model_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path))
    monkeypatch.setenv("SLIMSEG_OFFLINE", "1")
    model = slimseg.build_model("slimsam-77")
    slimseg.save_model(model, tmp_path / "slimsam-77-uniform.safetensors")
    assert slimseg.load_model("slimsam-77", device="cpu").config == model.config


def test_unknown_device_is_refused_before_loading(tmp_path):
    with pytest.raises(SlimsegError, match="unknown device 'gpu0'"):
        slimseg.load_model(tmp_path / "does-not-matter.pth", device="gpu0")


def test_stored_pixel_mean_and_std_are_kept(reference_and_checkpoint, tmp_path):
    _, state, _ = reference_and_checkpoint
    mean, std = (100.0, 110.5, 120.25), (50.0, 51.5, 52.75)
    path = tmp_path / "normalised.pth"
    torch.save({**state, "pixel_mean": torch.tensor(mean).view(3, 1, 1), "pixel_std": torch.tensor(std).view(3, 1, 1)},
               path)
    model = slimseg.load_model(path, device="cpu")
    assert model.config.pixel_mean == mean and model.config.pixel_std == std
    assert model.pixel_mean.flatten().tolist() == list(mean)
    # SAM's defaults stored in float32 stay SAM's defaults, not 123.67500305...
    default = slimseg.build_model(tiny_config()).config
    torch.save({**state, "pixel_mean": torch.tensor(default.pixel_mean)}, path)
    assert read_checkpoint(path).config == tiny_config()


def test_unreadable_checkpoints_give_one_line(reference_and_checkpoint, tmp_path):
    _, state, path = reference_and_checkpoint
    model = slimseg.load_model(path, device="cpu")
    sources = {"sa.pth": path, "native.safetensors": slimseg.save_model(model, tmp_path / "n.safetensors")}
    targets = []
    for name, source in sources.items():
        shutil.copy(source, tmp_path / name)
        (tmp_path / name).chmod(0)
        targets.append(tmp_path / name)
    folder = tmp_path / "hf"
    folder.mkdir()
    folder.chmod(0)
    targets.append(folder)
    try:
        if all(os.access(target, os.R_OK) for target in targets):
            pytest.skip("running as a user who reads files whatever their mode (root)")
        for target in targets:
            with pytest.raises(SlimsegError) as caught:
                slimseg.load_model(target, device="cpu")
            message = str(caught.value)
            assert message.startswith(f"{target}: cannot read") and "ermission denied" in message, message
    finally:
        folder.chmod(0o755)


def test_build_model_checks_the_device_before_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a layer was built before the device was checked")

    monkeypatch.setattr(torch.nn.Linear, "__init__", refuse)  # torch's, not slimseg's
    with pytest.raises(SlimsegError, match="unknown device 'gpu0'"):
        slimseg.build_model("sam-h", device="gpu0")


def test_save_model_expands_home_and_refuses_folders_and_impossible_paths(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimseg.cli.app import app

    model = slimseg.build_model(tiny_config())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # where an unexpanded ~ would become a folder
    written = slimseg.save_model(model, "~/models/m.safetensors")
    assert written == tmp_path / "home" / "models" / "m.safetensors" and written.is_file()
    assert not (tmp_path / "~").exists()
    (tmp_path / "folder.safetensors").mkdir()
    for target, reason in ((tmp_path / "folder.safetensors", "is a folder: give a file name"),
                           (tmp_path / "home" / "models" / "m.safetensors" / "x.safetensors", "is a file, not a folder"),
                           (Path("/proc/nope/x.safetensors"), "cannot write")):
        with pytest.raises(SlimsegError) as caught:
            slimseg.save_model(model, target)
        message = str(caught.value)
        assert str(target) in message and reason in message and ".tmp" not in message, message
    result = CliRunner().invoke(app, ["convert", str(written), "--out", "/proc/nope/x.safetensors"])
    assert result.exit_code in (1, 2) and "internal error" not in result.stderr, result.stderr
    assert "/proc/nope/x.safetensors" in result.stderr


def test_convert_refuses_to_overwrite_its_source_however_spelled(reference_and_checkpoint, tmp_path):
    from slimseg.zoo.loading import convert_checkpoint

    _, state, _ = reference_and_checkpoint
    source = tmp_path / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, source)
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(source)
    for out in (tmp_path / "sub" / ".." / "sam.safetensors", tmp_path / "link.safetensors"):
        with pytest.raises(SlimsegError, match="a file that this command reads"):
            convert_checkpoint(source, out)
        with pytest.raises(SlimsegError, match="a file that this command reads"):
            convert_checkpoint(out, source)
    assert source.read_bytes() == before


def test_lite_sam_weights_without_metadata_say_to_use_slimseg_format(tmp_path):
    model = slimseg.build_model("lite-sam")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "lite.safetensors")
    torch.save(model.state_dict(), tmp_path / "lite.pth")
    for name in ("lite.safetensors", "lite.pth"):
        with pytest.raises(SlimsegError, match="Lite-SAM weights without slimseg's metadata.*save_model"):
            slimseg.load_model(tmp_path / name, device="cpu")
