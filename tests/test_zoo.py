"""Registered names end to end: download into the cache, load, list, describe, convert."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import photo, tiny_config
from loopback import Route
from PIL import Image
from reference import randomise, reference_sam
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.errors import SlimsegError
from slimseg.zoo.checkpoint import read_checkpoint

runner = CliRunner()


@pytest.fixture()
def mirror(server, monkeypatch, tmp_path):
    """The loopback server as the model mirror and an empty cache."""
    monkeypatch.setenv("SLIMSEG_BASE_URL", f"{server.base}/models")
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path / "cache"))
    return server


@pytest.fixture()
def image(tmp_path) -> str:
    Image.fromarray(photo(64, 80)).save(tmp_path / "img.png")
    return str(tmp_path / "img.png")


@pytest.fixture(scope="module")
def sam_layout_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(randomise(reference_sam(tiny_config()), seed=5), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def slimsam_77_bytes(tmp_path_factory) -> bytes:
    """Random weights with slimsam-77's registered architecture, in slimseg's format."""
    path = tmp_path_factory.mktemp("weights") / "s77.safetensors"
    return slimseg.save_model(slimseg.build_model("slimsam-77"), path).read_bytes()


def _cache_files(tmp_path):
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _serve(mirror, filename: str, body: bytes) -> None:
    mirror.routes[f"/models/{filename}"] = Route(
        body=body, headers={"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"'})


def test_hub_model_downloads_verifies_loads_and_segments(mirror, tmp_path, slimsam_77_bytes, image):
    _serve(mirror, "slimsam-77-uniform.safetensors", slimsam_77_bytes)
    model = slimseg.load_model("slimsam-77", device="cpu")
    assert model.config == slimseg.build_model("slimsam-77").config
    assert _cache_files(tmp_path) == ["slimsam-77-uniform.safetensors"]
    # second time from the cache, through the command line
    result = runner.invoke(app, ["segment", image, "-b", "5,5,60,50", "-m", "slimsam-77"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["masks"]) == 1
    assert mirror.requests == ["/models/slimsam-77-uniform.safetensors"]
    listing = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert {row["name"]: row["cached"] for row in listing}["slimsam-77"] is True


def test_pinned_sha256_mismatch_leaves_no_file(mirror, tmp_path, sam_layout_bytes):
    mirror.routes["/models/sam_vit_b_01ec64.pth"] = Route(body=sam_layout_bytes)
    with pytest.raises(SlimsegError, match="sha256 mismatch .* the file was deleted"):
        slimseg.load_model("sam-b", device="cpu")
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("route", [Route(status=500, body=b"oops"),
                                   Route(body=b"x" * 4096, behaviour="cut",
                                         headers={"X-Linked-Etag": '"' + "0" * 64 + '"'})])
def test_server_errors_leave_no_file_and_say_so(mirror, tmp_path, route, image):
    mirror.routes["/models/slimsam-50-uniform.safetensors"] = route
    result = runner.invoke(app, ["segment", image, "-b", "0,0,5,5", "-m", "slimsam-50"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert ("HTTP 500" in result.stderr) or ("cut off" in result.stderr), result.stderr
    assert _cache_files(tmp_path) == []


def test_offline_names_the_file_and_where_to_put_it(mirror, tmp_path, image):
    result = runner.invoke(app, ["segment", image, "-b", "0,0,5,5", "-m", "sam-b", "--offline"])
    assert result.exit_code == 1
    assert "sam_vit_b_01ec64.pth" in result.stderr and str(tmp_path / "cache") in result.stderr
    assert mirror.requests == []
    result = runner.invoke(app, ["segment", image, "-b", "0,0,5,5", "-m", "sam-b"], env={"SLIMSEG_OFFLINE": "1"})
    assert result.exit_code == 1 and "offline" in result.stderr and mirror.requests == []


def test_global_slimsam_names_say_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path))
    with pytest.raises(SlimsegError, match=r"download SlimSAM-77.pth .* load it by its path") as caught:
        slimseg.load_model("slimsam-77-global", device="cpu")
    assert "load_model(path)" in str(caught.value)
    with pytest.raises(SlimsegError, match="widths that vary per block"):
        slimseg.build_model("slimsam-50-global")


def test_registry_lists_the_papers_models():
    names = slimseg.list_models()
    for name in ("sam-b", "slimsam-50", "slimsam-77", "slimsam-50-global", "slimsam-77-global"):
        assert name in names
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}
    assert rows["slimsam-77"]["parameters"] == 9_723_528 and rows["slimsam-50"]["parameters"] == 27_961_776
    assert rows["sam-b"]["sha256"] == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "slimsam-77" in table.stdout


def test_info_reports_widths_parameters_macs_and_sha256(tmp_path):
    config = tiny_config()
    path = slimseg.save_model(slimseg.build_model(config), tmp_path / "m.safetensors")
    report = json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)
    assert report["format"] == "slimseg"
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [b["mlp_dim"] for b in report["architecture"]["blocks"]] == [96] * 4
    assert report["parameters"]["total"] == sum(p.numel() for p in slimseg.build_model(config).parameters())
    assert report["macs"]["image_encoder"]["layers"] > 0 and report["macs"]["image_encoder"]["attention"] > 0
    sam_b = json.loads(runner.invoke(app, ["info", "sam-b", "--json"]).stdout)
    assert round(sam_b["macs"]["image_encoder"]["layers"] / 1e9, 1) == 368.7  # SlimSAM's counter: 368.86 G
    text = runner.invoke(app, ["info", str(path)])
    assert text.exit_code == 0 and "window 8" in text.stdout and "global" in text.stdout


def test_convert_any_format_to_slimseg(tmp_path, sam_layout_bytes):
    source = tmp_path / "sam.pth"
    source.write_bytes(sam_layout_bytes)
    result = runner.invoke(app, ["convert", str(source), "--out", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "out.safetensors").format == "slimseg"
    bad = runner.invoke(app, ["convert", str(source), "--out", str(tmp_path / "out.bin")])
    assert bad.exit_code == 2 and ".safetensors" in bad.stderr
    missing = runner.invoke(app, ["info", str(tmp_path / "nope.pth")])
    assert missing.exit_code == 1 and "nope.pth" in missing.stderr and "Traceback" not in missing.stderr


def test_lite_sam_builds_saves_loads_and_segments(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path / "cache"))
    with pytest.raises(SlimsegError, match="Lite-SAM has no public weights: train them with slimseg distill"):
        slimseg.load_model("lite-sam", device="cpu")
    model = slimseg.build_model("lite-sam")
    assert model.img_size == 640 and 4.0e6 < sum(p.numel() for p in model.parameters()) < 4.4e6
    path = slimseg.save_model(model, tmp_path / "lite.safetensors")
    loaded = slimseg.load_model(path, device="cpu")
    assert type(loaded) is type(model) and loaded.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    Image.fromarray(photo(120, 160)).save(tmp_path / "img.png")
    result = runner.invoke(app, ["segment", str(tmp_path / "img.png"), "-m", str(path), "-b", "10,10,100,100"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["masks"][0]["segmentation"]["size"] == [120, 160]
    every = runner.invoke(app, ["segevery", str(tmp_path / "img.png"), "-m", str(path), "--sampler", "autoppn",
                                "--pred-iou-thresh", "0", "--stability-score-thresh", "0"])
    assert every.exit_code == 0, every.output
    assert json.loads(every.stdout)["sampler"] == "autoppn"
    report = json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)
    assert report["architecture"]["family"] == "lite-sam" and report["parameters"]["autoppn"] > 0


def test_convert_refuses_a_folder_before_reading(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    # the source does not even exist: the output is checked first
    result = runner.invoke(app, ["convert", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 2, result.output
    assert "d.safetensors is a folder: give a file name" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_errors_start_with_the_checkpoint(tmp_path, sam_layout_bytes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = slimseg.save_model(slimseg.build_model(tiny_config()), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    metadata["slimseg.config"] = metadata["slimseg.config"][:-1] + ",}"  # broken JSON
    save_file(load_file(str(good)), str(tmp_path / "broken.safetensors"), metadata=metadata)
    state = torch.load(__import__("io").BytesIO(sam_layout_bytes), weights_only=True)
    torch.save({k: v for k, v in state.items() if "rel_pos" not in k}, tmp_path / "norel.pth")
    for name, reason in (("broken.safetensors", "invalid model config JSON"),
                         ("norel.pth", "no relative-position tables")):
        with pytest.raises(SlimsegError) as caught:
            slimseg.load_model(tmp_path / name, device="cpu")
        assert str(caught.value).startswith(f"{tmp_path / name}: ") and reason in str(caught.value)
        result = runner.invoke(app, ["info", str(tmp_path / name)])
        assert result.exit_code == 1 and f"error: {tmp_path / name}: " in result.stderr


def test_an_onnx_export_folder_as_a_checkpoint_says_which_commands_run_it(tmp_path, image):
    folder = tmp_path / "tiny-onnx"
    folder.mkdir()
    (folder / "slimseg.json").write_text("{}")
    result = runner.invoke(app, ["segment", image, "-m", str(folder), "-b", "0,0,10,10"])
    assert result.exit_code == 1
    assert f"{folder}: a slimseg ONNX export" in result.stderr and "--backend onnx" in result.stderr
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 1 and "segment and segevery run it with --backend onnx" in result.stderr
    assert "other commands need the checkpoint it was exported from" in result.stderr


def test_models_table_never_cuts_a_name():
    """Piped, rich draws 80 columns, too few for every column at its natural width."""
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= 80
    first_words = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    for name in slimseg.list_models():
        assert name in first_words, name


def test_cached_file_holding_another_model_is_refused(mirror, tmp_path, sam_layout_bytes, slimsam_77_bytes):
    """A registered name must give its own architecture, whatever sits in its cache slot."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sam_vit_b_01ec64.pth").write_bytes(sam_layout_bytes)  # a 48-wide SAM in sam-b's slot
    slimseg.save_model(slimseg.build_model("lite-sam"), cache / "slimsam-77-uniform.safetensors")
    for name, slot, found in (("sam-b", "sam_vit_b_01ec64.pth", "48-wide"),
                              ("slimsam-77", "slimsam-77-uniform.safetensors", "Lite-SAM")):
        with pytest.raises(SlimsegError) as caught:
            slimseg.load_model(name, device="cpu")
        message = str(caught.value)
        assert message.startswith(f"{cache / slot}: holds ") and found in message and f"not {name}" in message
        assert "delete it so that the next use downloads it again" in message and "\n" not in message
        info = runner.invoke(app, ["info", name])
        assert info.exit_code == 1 and "delete it" in info.stderr and "Traceback" not in info.stderr
    # a truncated cached file: the same advice
    (cache / "slimsam-77-uniform.safetensors").write_bytes(slimsam_77_bytes[: len(slimsam_77_bytes) // 2])
    with pytest.raises(SlimsegError, match="corrupt or truncated.*cached download of slimsam-77: delete it"):
        slimseg.load_model("slimsam-77", device="cpu")
    assert mirror.requests == []  # a cached file is used as it is, never re-fetched behind the user's back


def test_unknown_names_list_the_registered_ones_and_guess():
    for typo, guess in (("sam-vit-b", "'sam-b'"), ("slimsam-70", "'slimsam-77'")):
        with pytest.raises(SlimsegError) as caught:
            slimseg.load_model(typo, device="cpu")
        message = str(caught.value)
        assert "neither a registered model name nor an existing checkpoint" in message
        assert f"did you mean {guess}" in message or f"or {guess}" in message, message
        assert "registered models: " + ", ".join(slimseg.list_models()) in message
    with pytest.raises(SlimsegError, match=r"unknown model 'sam_b': did you mean 'sam-b'"):
        slimseg.build_model("sam_b")
    with pytest.raises(SlimsegError) as caught:
        slimseg.build_model("/path/x.pth")
    assert "load_model(path)" in str(caught.value) and "checkpoint path" not in str(caught.value)
    for name in ("lite-sam", "slimsam-50-global"):  # Python users get no command-line advice
        with pytest.raises(SlimsegError) as caught:
            slimseg.load_model(name, device="cpu", offline=True)
        assert "pass its path to --model" not in str(caught.value) and "load_model(path)" in str(caught.value)


def test_empty_name_and_a_local_folder_shadowing_a_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path / "cache"))
    with pytest.raises(SlimsegError, match="empty model name or path"):
        slimseg.load_model("", device="cpu")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sam-b").mkdir()
    with pytest.raises(SlimsegError) as caught:
        slimseg.load_model("sam-b", device="cpu", offline=True)
    message = str(caught.value)
    assert message.startswith("sam-b: folder holds no model.safetensors")
    assert "the local folder 'sam-b' shadows the registered model sam-b: rename it" in message


def _origin_words() -> set[str]:
    return {word for row in json.loads(runner.invoke(app, ["models", "--json"]).stdout) for word in row["origin"].split()}


@pytest.mark.parametrize("columns", [80, 200])
def test_models_table_keeps_words_whole_at_any_width(columns):
    result = runner.invoke(app, ["models"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= columns
    cells = {word for line in result.stdout.splitlines() for word in line.split()}
    assert _origin_words() <= cells, _origin_words() - cells  # "(dl.fbaipublicfiles.com)" is not folded
    assert "Apache-2.0" in result.stdout  # the licence is shown, as a column or below the table
    assert "JSON list" in runner.invoke(app, ["models", "--help"]).stdout
