"""Loading segment-anything state dicts and slimseg safetensors; refusing bad files."""

from __future__ import annotations

import pickle
import shutil

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


def test_registered_model_loads_from_cache(reference_and_checkpoint, tmp_path, monkeypatch):
    _, _, path = reference_and_checkpoint
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path))
    shutil.copy(path, tmp_path / "sam_vit_b_01ec64.pth")
    assert slimseg.load_model("sam-b", device="cpu").config == tiny_config()


def test_unknown_device_is_refused_before_loading(tmp_path):
    with pytest.raises(SlimsegError, match="unknown device 'gpu0'"):
        slimseg.load_model(tmp_path / "does-not-matter.pth", device="gpu0")
