"""Whole pickled models (SlimSAM's global checkpoints): tensors out, nothing executed."""

from __future__ import annotations

import builtins
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import slimseg
from slimseg.errors import SlimsegError
from slimseg.modeling.sam import BlockConfig, sam_vit_config
from slimseg.zoo.checkpoint import read_checkpoint
from slimseg.zoo.pickled import (
    pickled_class_names,
    read_pickled_checkpoint,
    read_pickled_module_state,
    strip_data_parallel,
)

# slimseg's module files mapped onto SlimSAM's package layout.
_FAKE_PACKAGE = "segment_anything_kd"
_MODULE_MAP = {
    "slimseg.modeling.sam.sam": "segment_anything_kd.modeling.sam",
    "slimseg.modeling.sam.image_encoder": "segment_anything_kd.modeling.image_encoder",
    "slimseg.modeling.sam.prompt_encoder": "segment_anything_kd.modeling.prompt_encoder",
    "slimseg.modeling.sam.mask_decoder": "segment_anything_kd.modeling.mask_decoder",
    "slimseg.modeling.sam.transformer": "segment_anything_kd.modeling.transformer",
    "slimseg.modeling.layers": "segment_anything_kd.modeling.common",
}


def _pruned_model() -> slimseg.Sam:
    """A tiny SAM whose blocks have unequal attention and MLP widths, with random weights."""
    config = sam_vit_config(48, 4, 4, (1, 3), window_size=8, img_size=256, mlp_dim=96)
    widths = zip((24, 36, 48, 12), (40, 72, 96, 16), (8, 0, 8, 0))
    blocks = tuple(BlockConfig(num_heads=4, qk_dim=d, v_dim=d, mlp_dim=m, window_size=w) for d, m, w in widths)
    model = slimseg.build_model(config.replace_encoder(blocks=blocks))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def _disguise_as_slimsam(model: torch.nn.Module) -> list[str]:
    """Re-home every slimseg class of ``model`` into fake ``segment_anything_kd`` modules, as
    SlimSAM's pickles name them; returns the fake module names to remove afterwards."""
    names = [_FAKE_PACKAGE, f"{_FAKE_PACKAGE}.modeling", *_MODULE_MAP.values()]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for module in model.modules():
        home = _MODULE_MAP.get(type(module).__module__)
        if home is None:
            continue
        original = type(module)
        fake = sys.modules[home].__dict__.get(original.__name__)
        if fake is None:
            fake = type(original.__name__, (original,), {"__module__": home, "__qualname__": original.__qualname__})
            setattr(sys.modules[home], original.__name__, fake)
        module.__class__ = fake
    return names


@pytest.fixture(scope="module")
def slimsam_pickle(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _pruned_model()
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    fake_modules = _disguise_as_slimsam(model)
    try:
        model.image_encoder = torch.nn.DataParallel(model.image_encoder)
        path = tmp_path_factory.mktemp("slimsam") / "SlimSAM-50.pth"
        torch.save(model, path)
    finally:
        for name in fake_modules:
            sys.modules.pop(name, None)
    return path, expected


def test_slimsam_style_pickle_gives_the_original_tensors(slimsam_pickle):
    path, expected = slimsam_pickle
    state = read_pickled_module_state(path)
    assert "image_encoder.module.blocks.0.attn.q.weight" in state
    state = strip_data_parallel(state)
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and state[key].shape == tensor.shape, key
        assert state[key].numpy().tobytes() == tensor.numpy().tobytes(), key
    assert state["image_encoder.blocks.3.mlp.lin1.weight"].shape[0] == 16
    assert state["image_encoder.blocks.1.attn.q.weight"].shape[0] == 36
    assert any(".rel_pos_h" in key for key in state) and "image_encoder.pos_embed" in state
    assert _FAKE_PACKAGE not in sys.modules  # reading imported nothing


def test_class_names_identify_the_pickle(slimsam_pickle):
    path, _ = slimsam_pickle
    names = pickled_class_names(path)
    assert "segment_anything_kd.modeling.sam.Sam" in names
    assert "segment_anything_kd.modeling.image_encoder.ImageEncoderViT" in names
    assert "torch.nn.parallel.data_parallel.DataParallel" in names
    assert read_pickled_checkpoint(path).class_names == frozenset(names)


def test_loaded_state_builds_a_working_model(slimsam_pickle):
    path, expected = slimsam_pickle
    model = _pruned_model()
    model.load_state_dict(strip_data_parallel(read_pickled_module_state(path)), strict=True)
    assert torch.equal(model.image_encoder.pos_embed, expected["image_encoder.pos_embed"])


class _Evil:
    def __init__(self, target, args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


def _pickle_string(text: str) -> bytes:
    encoded = text.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE


def _subprocess_data_pkl(marker: Path) -> bytes:
    """``{"x": subprocess.check_call(["touch", marker])}`` as hand-written opcodes (pickle.dumps
    would rename the module to Python 2's ``commands``)."""
    arguments = b"](" + _pickle_string("touch") + _pickle_string(str(marker)) + b"e"  # list via APPENDS
    return b"\x80\x02}" + _pickle_string("x") + b"csubprocess\ncheck_call\n" + arguments + b"\x85Rs."


def _write_evil(kind: str, marker: Path, path: Path) -> None:
    if kind == "os.system":
        torch.save({"x": _Evil(os.system, (f"touch {marker}",)), "w": torch.ones(2)}, path)
    elif kind == "builtins.exec":
        torch.save({"x": _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)), "w": torch.ones(2)}, path)
    elif kind == "raw pickle":
        path.write_bytes(pickle.dumps(_Evil(os.system, (f"touch {marker}",)), protocol=2))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("evil/data.pkl", _subprocess_data_pkl(marker))
            archive.writestr("evil/byteorder", sys.byteorder)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("os.system", "holds no model tensors"),
        ("builtins.exec", "holds no model tensors"),
        ("raw pickle", "not a torch zip checkpoint"),
        ("subprocess GLOBAL+REDUCE", "holds no model tensors"),
    ],
)
def test_malicious_pickles_are_refused_without_running(tmp_path, kind, error):
    # Positive control: an ordinary unpickler really does run the payload.
    control_marker, control = tmp_path / "control-ran", tmp_path / "control.pth"
    _write_evil(kind, control_marker, control)
    if kind == "raw pickle":
        pickle.loads(control.read_bytes())
    elif kind.startswith("subprocess"):
        with zipfile.ZipFile(control) as archive:
            pickle.loads(archive.read("evil/data.pkl"))
    else:
        torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    _write_evil(kind, marker, path)
    with pytest.raises(SlimsegError) as caught:
        read_pickled_module_state(path)
    assert str(caught.value).startswith(f"{path}: {error}")
    assert not marker.exists()


def test_importable_module_named_by_the_file_is_not_imported(tmp_path, monkeypatch):
    """A module the file names that WOULD run code on import stays unimported."""
    marker = tmp_path / "imported"
    fake = types.ModuleType("slimseg_probe_module")
    fake.Thing = type("Thing", (torch.nn.Linear,), {"__module__": "slimseg_probe_module"})
    monkeypatch.setitem(sys.modules, "slimseg_probe_module", fake)
    path = tmp_path / "probe.pth"
    torch.save(fake.Thing(2, 3), path)
    monkeypatch.delitem(sys.modules, "slimseg_probe_module")
    (tmp_path / "slimseg_probe_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nThing = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state = read_pickled_module_state(path)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, 2)
    assert not marker.exists() and "slimseg_probe_module" not in sys.modules


def _valid_save(tmp_path: Path) -> Path:
    path = tmp_path / "valid.pth"
    torch.save(torch.nn.Linear(4, 3), path)
    return path


def _assert_one_line_error(path: Path, fragment: str) -> None:
    with pytest.raises(SlimsegError) as caught:
        read_pickled_module_state(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and fragment in message, message


def test_truncated_file_is_refused(tmp_path):
    valid = _valid_save(tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    _assert_one_line_error(truncated, "not a torch zip checkpoint")


def test_missing_storage_record_is_refused(tmp_path):
    valid = _valid_save(tmp_path)
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(valid) as source, zipfile.ZipFile(broken, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith("/data/1"):
                target.writestr(info, source.read(info))
    _assert_one_line_error(broken, "missing storage record valid/data/1")


def test_random_bytes_and_corrupt_pickle_are_refused(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    _assert_one_line_error(noise, "not a torch zip checkpoint")
    corrupt = tmp_path / "corrupt.pth"
    with zipfile.ZipFile(corrupt, "w") as archive:
        archive.writestr("c/data.pkl", b"\x80\x02}q\x00(X\x01")
    _assert_one_line_error(corrupt, "corrupt or unsupported checkpoint")


def test_plain_state_dict_round_trips_with_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"w": base, "row": base[1], "t": base.t(), "h": torch.ones(3, dtype=torch.float16),
             "n": torch.tensor(5), "b": torch.tensor([True, False])}
    path = tmp_path / "state.pth"
    torch.save(state, path)
    loaded = read_pickled_module_state(path)
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert loaded["t"].stride() == (1, 4)
    assert loaded["row"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
    loaded["w"][1, 0] = -1.0  # shared in the file, shared in memory
    assert loaded["row"][0] == -1.0 and loaded["t"][0, 1] == -1.0


def test_strip_data_parallel_leaves_other_keys_alone():
    tensor = torch.zeros(1)
    state = {"image_encoder.module.a.weight": tensor, "mask_decoder.module.x": tensor, "mask_decoder.y": tensor}
    assert set(strip_data_parallel(state)) == {"image_encoder.a.weight", "mask_decoder.module.x", "mask_decoder.y"}
    assert set(strip_data_parallel({"module.a.b": tensor, "module.c": tensor})) == {"a.b", "c"}


def test_load_model_reads_the_slimsam_pickle_end_to_end(slimsam_pickle, tmp_path):
    path, expected = slimsam_pickle
    model = slimseg.load_model(path, device="cpu")
    assert read_checkpoint(path).format == "pickled-model"
    widths = [(b.qk_dim, b.mlp_dim) for b in model.config.image_encoder.blocks]
    assert widths == [(24, 40), (36, 72), (48, 96), (12, 16)]
    for key, tensor in expected.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    converted = slimseg.save_model(model, tmp_path / "slimsam.safetensors")
    assert read_checkpoint(converted).config == model.config


def _sam_state() -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in _pruned_model().state_dict().items()}


def test_training_checkpoints_with_other_objects_load(tmp_path):
    """weights_only refuses a Namespace or a numpy scalar; the restricted unpickler reads the
    tensors under the usual keys and leaves the rest as inert placeholders."""
    import argparse

    import numpy as np

    state = _sam_state()
    checkpoints = {
        "namespace.pth": {"model": state, "args": argparse.Namespace(lr=0.1), "epoch": 3},
        "lightning.pth": {"state_dict": state, "hyper_parameters": {"x": np.float64(1.0)}},
        "ddp.pth": {"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace()},
        "two-levels.pth": {"checkpoint": 1, "model": {"state_dict": state, "meta": argparse.Namespace(a=1)}},
    }
    for name, payload in checkpoints.items():
        torch.save(payload, tmp_path / name)
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.format == "segment-anything", name
        assert set(checkpoint.state_dict) == set(state), name
        for key, tensor in state.items():
            assert torch.equal(checkpoint.state_dict[key], tensor), (name, key)
    assert slimseg.load_model(tmp_path / "namespace.pth", device="cpu").config.image_encoder.blocks[1].qk_dim == 36


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess"])
def test_payloads_beside_the_weights_of_a_training_checkpoint_never_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": _Evil(os.system, (f"touch {marker}",)),
        "builtins.exec": _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess": _Evil(__import__("subprocess").check_call, (["touch", str(marker)],)),
    }
    path = tmp_path / "train.pth"
    torch.save({"model": _sam_state(), "args": payloads[kind], "epoch": 1}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what sends the file to the restricted unpickler
    model = slimseg.load_model(path, device="cpu")
    assert model.config.image_encoder.blocks[3].mlp_dim == 16
    assert not marker.exists()
    torch.load(path, weights_only=False)  # positive control: an ordinary load runs the payload
    assert marker.exists()
