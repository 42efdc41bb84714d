"""Export folders and exported files checked: manifests, graphs, the folders slimseg
replaces, interrupted exports (the round trips are in test_export.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_export import assert_one_line_error, invoke

from slimseg.errors import SlimsegError
from slimseg.export.manifest import MANIFEST_NAME, read_manifest
from slimseg.export.runtime import OnnxSam

pytest.importorskip("onnxruntime")


def _manifest_copy(exported, folder: Path, files=("image_encoder.onnx", "decoder.onnx")) -> dict:
    """The float32 files of ``exported`` (hard links: no copy) under a float32-only manifest."""
    folder.mkdir()
    for name in files:
        os.link(exported[0] / name, folder / name)
    manifest = json.loads(json.dumps(exported[1]))
    manifest["variants"], manifest["default_variant"] = {"float32": manifest["variants"]["float32"]}, "float32"
    return manifest


@pytest.mark.parametrize("field, edit", [
    ("variants", lambda m: m.pop("variants")),
    ("variants", lambda m: m.update(variants=["float32"])),
    ("variants.float32.decoder", lambda m: m["variants"]["float32"].pop("decoder")),
    ("default_variant", lambda m: m.pop("default_variant")),
    ("default_variant", lambda m: m.update(default_variant="int8")),
    ("input_size", lambda m: m.pop("input_size")),
    ("input_size", lambda m: m.update(input_size="256")),
    ("image_input", lambda m: m.pop("image_input")),
    ("pixel_mean", lambda m: m.update(pixel_mean=[1, 2])),
    ("pixel_std", lambda m: m.update(pixel_std=[1, 0, 1])),
    ("low_res_mask_size", lambda m: m.pop("low_res_mask_size")),
    ("mask_threshold", lambda m: m.update(mask_threshold="abc")),
    ("manifest version true", lambda m: m.update(format_version=True)),
    ("variants.float32.decoder must be a file name", lambda m: m["variants"]["float32"].update(decoder="/etc/passwd")),
    ("variants.float32.decoder must be a file name", lambda m: m["variants"]["float32"].update(decoder="../x/decoder.onnx")),
])
def test_read_manifest_names_the_bad_field(exported, tmp_path, field, edit):
    manifest = _manifest_copy(exported, tmp_path / "export", files=())
    for name in ("image_encoder.onnx", "decoder.onnx"):
        (tmp_path / "export" / name).write_bytes(b"")  # read_manifest does not open graphs
    edit(manifest)
    (tmp_path / "export" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SlimsegError) as error:
        OnnxSam(tmp_path / "export")
    assert str(error.value).startswith(f"{tmp_path / 'export' / MANIFEST_NAME}: ") and field in str(error.value)
    assert "\n" not in str(error.value)


def test_read_manifest_refuses_a_graph_linked_from_outside(exported, tmp_path):
    manifest = _manifest_copy(exported, tmp_path / "export", files=("image_encoder.onnx",))
    (tmp_path / "export" / "decoder.onnx").symlink_to(exported[0] / "decoder.onnx")
    (tmp_path / "export" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SlimsegError, match="decoder.onnx leads outside the export folder"):
        read_manifest(tmp_path / "export")


@pytest.mark.parametrize("file, edit", [
    ("image_encoder.onnx", lambda m: m.update(input_size=512)),
    ("image_encoder.onnx", lambda m: m.update(image_input="uint8")),
    ("decoder.onnx", lambda m: m.update(low_res_mask_size=[32, 32])),
    ("image_encoder.onnx", lambda m: m.update(embedding_shape=[256, 8, 8])),
    ("decoder.onnx", lambda m: m["variants"]["float32"].update(image_encoder="decoder.onnx")),
])
def test_graphs_that_do_not_match_the_manifest_are_refused_when_opened(exported, tmp_path, file, edit):
    manifest = _manifest_copy(exported, tmp_path / "export")
    edit(manifest)
    (tmp_path / "export" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SlimsegError, match="the manifest describes") as error:
        OnnxSam(tmp_path / "export")
    assert str(error.value).startswith(str(tmp_path / "export" / file)) and "\n" not in str(error.value)


def test_onnxruntime_failures_are_one_line_naming_the_graph(exported):
    model = OnnxSam(exported[0], variant="float32")
    with pytest.raises(SlimsegError, match="decoder.onnx: onnxruntime failed to run it") as error:
        model.decode({"image_embeddings": np.zeros((1, 256, 16, 16)), "point_coords": np.zeros((2, 1, 2)),
                      "point_labels": np.zeros((3, 1)), "mask_input": np.zeros((1, 1, 64, 64)),
                      "has_mask_input": np.zeros(1), "orig_im_size": np.array([60.0, 80.0])})
    assert "\n" not in str(error.value)


def test_cli_export_replaces_only_folders_slimseg_wrote(model_path, exported, tmp_path):
    """A slimseg.json alone does not make a folder replaceable, nor does an export that the
    user added files to: both are refused before the model is read."""
    absent = tmp_path / "absent.safetensors"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST_NAME).write_text("{}")
    (fake / "thesis.tex").write_text("mine")
    result = invoke("export", "--model", absent, "--format", "safetensors", "--out", fake)
    assert_one_line_error(result, "not a valid export manifest", "refusing to overwrite")
    assert result.exit_code == 2 and sorted(p.name for p in fake.iterdir()) == [MANIFEST_NAME, "thesis.tex"]
    onnx_export = tmp_path / "onnx"
    (onnx_export / "photos").mkdir(parents=True)
    for name in os.listdir(exported[0]):
        os.link(exported[0] / name, onnx_export / name)
    st_export = tmp_path / "st"
    assert invoke("export", "--model", model_path, "--format", "safetensors", "--out", st_export).exit_code == 0
    (onnx_export / "notes.txt").write_text("mine")
    (st_export / "notes.txt").write_text("mine")
    for folder in (onnx_export, st_export):
        for fmt in ("onnx", "safetensors"):
            result = invoke("export", "--model", absent, "--format", fmt, "--out", folder)
            assert_one_line_error(result, "notes.txt", "did not write: refusing to overwrite")
            assert result.exit_code == 2 and (folder / "notes.txt").read_text() == "mine"
    assert "holds notes.txt, photos/, which" in invoke("export", "--model", absent, "--out", onnx_export).stderr


def test_cli_export_into_the_current_folder_and_through_a_symlink(model_path, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("export", "--model", model_path, "--format", "safetensors", "--out", ".")
    assert result.exit_code == 0, result.output
    assert [p.name for p in Path(".").iterdir()] == ["model.safetensors"]  # the same folder, filled
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    for _ in range(2):  # into the empty folder, then replacing the export there
        assert invoke("export", "--model", model_path, "--format", "safetensors", "--out", link).exit_code == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "link", "target"]  # nothing left aside


def test_stale_staging_folders_of_killed_exports_are_removed(tmp_path):
    from slimseg.export.folders import staging_folder

    stale, fresh, other = (tmp_path / ".out.0123abcd.tmp", tmp_path / ".out.89abcdef.tmp", tmp_path / ".outer.0123abcd.tmp")
    hour_ago = time.time() - 3700
    for folder in (stale, fresh, other):
        folder.mkdir()
        (folder / "image_encoder.onnx").write_text("partial")
        if folder is not fresh:
            os.utime(folder / "image_encoder.onnx", (hour_ago, hour_ago))
            os.utime(folder, (hour_ago, hour_ago))
    with staging_folder(tmp_path / "out") as staging:
        (staging / "f").write_text("x")
    # a fresh one may belong to an export still running; .outer.* belongs to another --out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, "out"])


def test_sigterm_during_export_cleans_up(model_path, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "slimseg", "export", "--model", str(model_path), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "terminated" in stderr, stderr
    assert list(tmp_path.iterdir()) == []
