"""``slimseg export`` and the onnx backend on tiny models: graph semantics, runtime, CLI, bad inputs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import photo, random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.errors import SlimsegError
from slimseg.export.graphs import DecoderGraph
from slimseg.export.manifest import MANIFEST_NAME, read_manifest
from slimseg.export.onnx import export_onnx
from slimseg.export.runtime import OnnxPredictor, OnnxSam
from slimseg.inference.everything import MaskGenerator
from slimseg.inference.predictor import Predictor

pytest.importorskip("onnxruntime")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def predictors(tiny, exported):
    image = photo(120, 160, seed=4)
    torch_predictor, onnx_predictor = Predictor(tiny), OnnxPredictor(OnnxSam(exported[0], variant="float32"))
    torch_predictor.set_image(image)
    onnx_predictor.set_image(image)
    return torch_predictor, onnx_predictor


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> float:
    rel = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    assert rel < tol, rel
    return rel


def test_decoder_graph_matches_the_torch_predictor(tiny, predictors):
    """The wrapper's label codes (2/3 corners, -1 padding, mask switch) mean what the prompt
    encoder means: same logits as Predictor.predict_torch for boxes, points and box + points."""
    torch_predictor, _ = predictors
    graph = DecoderGraph(tiny)
    boxes = torch.tensor([[10.0, 20.0, 150.0, 200.0], [50.0, 60.0, 90.0, 100.0]])
    points = torch.tensor([[[30.0, 40.0], [100.0, 120.0]]] * 2)
    labels = torch.tensor([[1, 0]] * 2)
    size = torch.tensor(torch_predictor.original_size, dtype=torch.float32)
    no_mask, flag = torch.zeros(1, 1, 64, 64), torch.zeros(1)
    pad = (torch.zeros(2, 1, 2), torch.full((2, 1), -1.0))
    corners = (boxes.reshape(2, 2, 2), torch.tensor([[2.0, 3.0]] * 2))
    cases = [
        (dict(point_coords=None, point_labels=None, boxes=boxes), corners),
        (dict(point_coords=points, point_labels=labels),
         (torch.cat([points, pad[0]], 1), torch.cat([labels.float(), pad[1]], 1))),
        (dict(point_coords=points, point_labels=labels, boxes=boxes),
         (torch.cat([points, corners[0]], 1), torch.cat([labels.float(), corners[1]], 1))),
    ]
    with torch.no_grad():
        for kwargs, (coords, codes) in cases:
            want, iou, _ = torch_predictor.predict_torch(**kwargs, multimask_output=True, return_logits=True)
            masks, scores, low_res = graph(torch_predictor.features, coords, codes, no_mask, flag, size)
            _close(masks[:, 1:], want, 1e-5)
            _close(scores[:, 1:], iou, 1e-5)
        mask_input = low_res[:, :1]
        want, _, _ = torch_predictor.predict_torch(None, None, boxes, mask_input, multimask_output=False, return_logits=True)
        masks, _, _ = graph(torch_predictor.features, *corners, mask_input, torch.ones(1), size)
        _close(masks[:, :1], want, 1e-5)
        # one mask shared by both prompts
        want, _, _ = torch_predictor.predict_torch(None, None, boxes, mask_input[:1].expand(2, -1, -1, -1),
                                                   multimask_output=False, return_logits=True)
        masks, _, _ = graph(torch_predictor.features, *corners, mask_input[:1], torch.ones(1), size)
        _close(masks[:, :1], want, 1e-5)


def test_onnx_predictor_matches_torch_for_boxes_points_and_masks(predictors):
    torch_predictor, onnx_predictor = predictors
    _close(onnx_predictor.get_image_embedding(), torch_predictor.get_image_embedding())
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (16, 2))
    boxes = torch.as_tensor(np.concatenate([xy, xy + rng.uniform(10, 50, (16, 2))], 1), dtype=torch.float)
    for count in (1, 16):
        for multimask in (True, False):
            want = torch_predictor.predict_torch(None, None, boxes[:count], multimask_output=multimask, return_logits=True)
            got = onnx_predictor.predict_torch(None, None, boxes[:count], multimask_output=multimask, return_logits=True)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                _close(g, w)
    masks, scores, low_res = torch_predictor.predict(np.array([[40, 50], [80, 30]]), np.array([1, 0]))
    got = onnx_predictor.predict(np.array([[40, 50], [80, 30]]), np.array([1, 0]))
    assert (got[0] == masks).mean() > 0.999 and np.allclose(got[1], scores, atol=1e-4)
    want = torch_predictor.predict(box=np.array([10, 10, 100, 90]), mask_input=low_res[:1], multimask_output=False,
                                   return_logits=True)
    got = onnx_predictor.predict(box=np.array([10, 10, 100, 90]), mask_input=low_res[:1], multimask_output=False,
                                 return_logits=True)
    _close(torch.from_numpy(got[0]), torch.from_numpy(want[0]))
    # a different mask for each prompt: the exported graph must not share the first one
    per_prompt = torch.from_numpy(low_res[:2, None]).clone()
    per_prompt[1] = -per_prompt[1]
    want = torch_predictor.predict_torch(None, None, boxes[:2], per_prompt, multimask_output=False, return_logits=True)
    got = onnx_predictor.predict_torch(None, None, boxes[:2], per_prompt, multimask_output=False, return_logits=True)
    for g, w in zip(got, want):
        _close(g, w)
    assert not torch.allclose(want[2][0], want[2][1])


def test_manifest_describes_the_export(exported, tiny):
    folder, manifest = exported
    assert read_manifest(folder) == json.loads((folder / MANIFEST_NAME).read_text()) == manifest
    assert manifest["input_size"] == 256 and manifest["opset"] == 17 and manifest["family"] == "sam"
    assert manifest["slimseg_version"] == slimseg.__version__
    assert manifest["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert manifest["model_config"] == json.loads(tiny.config.to_json())
    assert set(manifest["variants"]) == {"float32", "int8", "float16"} and manifest["default_variant"] == "int8"
    decoder = manifest["graphs"]["decoder"]
    assert decoder["inputs"]["point_coords"]["shape"] == ["prompts", "points", 2]
    assert decoder["outputs"]["masks"]["shape"] == ["prompts", 4, "height", "width"]
    assert manifest["graphs"]["image_encoder"]["inputs"]["image"] == {"shape": ["batch", 3, 256, 256], "dtype": "float32"}
    assert "autoppn" not in manifest["graphs"] and manifest["autoppn"] is None
    # each written file's own dtypes: float16 encoders take float16, decoders keep float32 IO
    encoder, decoder = (manifest["graphs"][g]["variants"] for g in ("image_encoder", "decoder"))
    assert encoder["float16"] == {"file": "image_encoder.float16.onnx",
                                  "dtypes": {"image": "float16", "image_embeddings": "float16"}}
    assert encoder["int8"]["dtypes"]["image"] == "float32" and set(decoder["float16"]["dtypes"].values()) == {"float32"}
    diffs = manifest["verification"]["diffs"]
    for case in ("encoder_batch2", "1_box", "16_boxes", "points_padded", "mask_input"):
        assert max(d["rel"] for d in diffs["float32"][case].values()) < 1e-3
        assert max(d["rel"] for d in diffs["float16"][case].values()) < 2e-2
    assert 0.5 <= manifest["verification"]["int8_mask_iou"] <= 1.0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST_NAME] + [name for files in manifest["variants"].values() for name in files.values()])


def test_int8_and_float16_variants_run_and_mostly_agree(predictors, exported):
    torch_predictor, _ = predictors
    box = torch.tensor([[20.0, 30.0, 140.0, 110.0]])
    want = torch_predictor.predict_torch(None, None, box, multimask_output=False)[0]
    for variant in ("int8", "float16"):
        predictor = OnnxPredictor(OnnxSam(exported[0], variant=variant))
        predictor.set_image(photo(120, 160, seed=4))
        got = predictor.predict_torch(None, None, box, multimask_output=False)[0]
        iou = float((got & want).sum() / (got | want).sum().clamp(min=1))
        assert iou > 0.8, (variant, iou)


def test_uint8_input_encoder_has_dynamic_batch_and_size(tiny, tmp_path, predictors):
    manifest = export_onnx(tiny, tmp_path / "u8", uint8_input=True)
    assert manifest["image_input"] == "uint8"
    assert manifest["graphs"]["image_encoder"]["inputs"]["image"] == {"shape": ["batch", 3, "height", "width"], "dtype": "uint8"}
    model = OnnxSam(tmp_path / "u8")
    images = torch.randint(0, 256, (3, 3, 200, 256), dtype=torch.uint8)
    with torch.no_grad():
        want = tiny.image_encoder(tiny.preprocess(images.float()))
    _close(torch.from_numpy(model.embed(images)), want)
    # the graph would crop or pad any other size silently
    for shape in [(1, 3, 100, 100), (1, 3, 300, 200), (3, 256, 200)]:
        with pytest.raises(SlimsegError, match=r"max\(H, W\) == 256"):
            model.embed(torch.zeros(shape, dtype=torch.uint8))
    predictor = OnnxPredictor(model)
    predictor.set_image(photo(120, 160, seed=4))
    _close(predictor.get_image_embedding(), predictors[0].get_image_embedding())
    # images of different sizes in one embed_images call: each as set_image embeds it
    pictures = [photo(120, 160, seed=4), photo(90, 40, seed=6)]
    for picture, embedding in zip(pictures, predictor.embed_images(pictures)):
        predictors[0].set_image(picture)
        _close(embedding.features, predictors[0].get_image_embedding())
    predictors[0].set_image(pictures[0])


def test_mask_generator_runs_on_exported_files(tiny, exported):
    image = photo(96, 128, seed=5)
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    want = MaskGenerator(tiny, **options).generate(image)
    got = MaskGenerator(OnnxSam(exported[0], variant="float32"), **options).generate(image)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert (a["segmentation"] == b["segmentation"]).mean() > 0.99
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-3)


def test_segment_backend_onnx_gives_the_torch_masks(model_path, tiny, tmp_path):
    folder = tmp_path / "float-onnx"
    export_onnx(tiny, folder)  # float32 only: the shared export defaults to its int8 files
    image = tmp_path / "a.png"
    Image.fromarray(photo(120, 160, seed=1)).save(image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"box": [10, 10, 100, 90]}, {"box": [30, 20, 150, 110], "points": [[60, 50, 1]]},
                                   {"points": [[40, 50, 1], [90, 70, 0]]}]))
    args = ["segment", image, "--prompts", prompts, "--multimask", "--device", "cpu"]
    want = invoke(*args, "--model", model_path)
    got = invoke(*args, "--model", folder, "--backend", "onnx")
    assert want.exit_code == 0 and got.exit_code == 0, got.output
    want, got = json.loads(want.stdout), json.loads(got.stdout)
    from slimseg.inference.masks import decode_rle

    assert len(got["masks"]) == len(want["masks"]) == 9
    for a, b in zip(got["masks"], want["masks"]):
        # logits agree to ~1e-6 relative, but the tiny random model's logits are nearly flat
        # around 0 in places, so a few pixels may flip
        assert (decode_rle(a["segmentation"]) == decode_rle(b["segmentation"])).mean() > 0.98
    assert [m["score"] for m in got["masks"]] == pytest.approx([m["score"] for m in want["masks"]], abs=1e-4)


def test_segevery_backend_onnx_gives_the_torch_records(model_path, tiny, tmp_path):
    folder = tmp_path / "float-onnx"
    export_onnx(tiny, folder)
    image = tmp_path / "a.png"
    Image.fromarray(photo(96, 128, seed=5)).save(image)
    args = ["segevery", image, "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--device", "cpu"]
    outputs = []
    for backend_args in (["--model", model_path], ["--model", folder, "--backend", "onnx", "--batch-size", "2"]):
        out = tmp_path / f"out{len(outputs)}"
        result = invoke(*args, *backend_args, "--out", out)
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((out / "a.json").read_text()))
    want, got = outputs
    assert len(got) == len(want) > 0
    assert [r["predicted_iou"] for r in got] == pytest.approx([r["predicted_iou"] for r in want], abs=1e-3)
    result = invoke(*args, "--model", folder, "--backend", "onnx", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "--dtype applies to --backend torch" in result.stderr


def test_autoppn_runs_on_an_exported_lite_sam(tmp_path):
    from test_train import tiny_lite_sam_config

    lite = slimseg.build_model(tiny_lite_sam_config()).eval()
    export_onnx(lite, tmp_path / "lite")
    exported = OnnxSam(tmp_path / "lite")
    assert exported.autoppn.config.top_k == lite.autoppn.config.top_k
    image = photo(90, 120, seed=2)
    options = dict(sampler="autoppn", max_proposals=12, pred_iou_thresh=0, stability_score_thresh=0)
    want = MaskGenerator(lite, **options).generate(image)
    got = MaskGenerator(exported, **options).generate(image)
    assert len(got) == len(want) > 0
    assert [r["point_coords"] for r in got] == [r["point_coords"] for r in want]
    assert [r["predicted_iou"] for r in got] == pytest.approx([r["predicted_iou"] for r in want], abs=1e-3)


def test_cli_export_onnx_prints_the_difference(model_path, tmp_path):
    result = invoke("export", "--model", model_path, "--out", tmp_path / "cli", "--opset", "16")
    assert result.exit_code == 0, result.output
    assert "max difference from torch" in result.stderr
    record = json.loads(result.stdout)
    assert record["default_variant"] == "float32" and "decoder.onnx" in record["files"]
    assert read_manifest(tmp_path / "cli")["opset"] == 16
    again = invoke("export", "--model", model_path, "--out", tmp_path / "cli")  # replaces an earlier export
    assert again.exit_code == 0, again.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_export_safetensors_round_trips(model_path, tiny, tmp_path):
    result = invoke("export", "--model", model_path, "--format", "safetensors", "--out", tmp_path / "st")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"source": str(model_path), "format": "safetensors", "out": str(tmp_path / "st"),
                                         "files": ["model.safetensors"], "source_format": "slimseg"}
    loaded = slimseg.load_model(tmp_path / "st" / "model.safetensors", device="cpu")
    assert loaded.config == tiny.config
    for (name, a), (_, b) in zip(loaded.state_dict().items(), tiny.state_dict().items()):
        assert torch.equal(a, b), name
    again = invoke("export", "--model", model_path, "--format", "safetensors", "--out", tmp_path / "st")
    assert again.exit_code == 0, again.output  # an earlier safetensors export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_cli_export_checks_out_before_reading_the_model(tmp_path, fmt):
    """A missing model: had the checkpoint been read first, the error would be about it."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"not really")
    absent = tmp_path / "absent.safetensors"
    result = invoke("export", "--model", absent, "--format", fmt, "--out", tmp_path / "afile")
    assert result.exit_code == 2 and "afile is a file: give a folder" in result.stderr, result.output
    result = invoke("export", "--model", absent, "--format", fmt, "--out", tmp_path / "photos")
    assert result.exit_code == 2 and "not an earlier export: refusing to overwrite it" in result.stderr, result.output
    assert (tmp_path / "afile").read_text() == "mine" and [p.name for p in (tmp_path / "photos").iterdir()] == ["a.png"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_folders_get_an_ordinary_folders_permissions(tmp_path, umask):
    from slimseg.export.folders import staging_folder

    previous = os.umask(umask)
    try:
        with staging_folder(tmp_path / "out") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--format", "tflite"], "tflite"),
        (["--opset", "9"], "--opset 9 is not supported"),
        (["--format", "safetensors", "--quantize", "int8"], "--quantize applies to --format onnx only"),
        (["--quantize", "int4"], "int4"),
    ],
)
def test_cli_export_bad_options(model_path, tmp_path, args, fragment):
    result = invoke("export", "--model", model_path, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert fragment in result.stderr or fragment in result.output
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_a_foreign_folder(model_path, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("export", "--model", model_path, "--out", tmp_path / "out"), "refusing to overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_failed_verification_leaves_nothing_and_the_model_as_it_was(tmp_path, monkeypatch):
    from slimseg.export import verify

    model = random_tiny_model(3).to(torch.bfloat16).train()
    model.mask_decoder.eval()
    monkeypatch.setitem(verify.TOLERANCE, "float32", 1e-12)
    with pytest.raises(SlimsegError, match="failed verification"):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # exported from a float32 copy: the caller's model keeps its dtype and modes
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.training and model.image_encoder.training and not model.mask_decoder.training


def test_segment_backend_onnx_needs_an_export_folder(model_path, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(photo(60, 80)).save(image)
    result = invoke("segment", image, "--box", "1,1,30,30", "--model", model_path, "--backend", "onnx")
    assert_one_line_error(result, "slimseg export")
    result = invoke("segment", image, "--box", "1,1,30,30", "--model", tmp_path, "--backend", "onnx")
    assert_one_line_error(result, "no slimseg.json")


def test_missing_extra_names_what_to_install(model_path, tmp_path):
    """onnx made unimportable in a fresh interpreter: one line naming the extra, nothing written."""
    script = (
        "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
        "from slimseg.cli.app import main; sys.argv = ['slimseg', 'export', '--model', sys.argv[1], '--out', sys.argv[2]]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(model_path), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'slimseg[export]'" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_onnx_predictor_without_points_or_boxes_matches_torch(predictors):
    """No prompt, or only mask_input: the decoder gets no sparse token, as in torch."""
    torch_predictor, onnx_predictor = predictors
    want = torch_predictor.predict(return_logits=True)
    got = onnx_predictor.predict(return_logits=True)
    for g, w in zip(got, want):
        _close(torch.from_numpy(g), torch.from_numpy(w))
    for multimask in (True, False):
        want = torch_predictor.predict(mask_input=want[2][:1], multimask_output=multimask, return_logits=True)
        got = onnx_predictor.predict(mask_input=want[2][:1], multimask_output=multimask, return_logits=True)
        for g, w in zip(got, want):
            _close(torch.from_numpy(g), torch.from_numpy(w))
    for return_logits in (True, False):
        want = torch_predictor.predict_torch(None, None, torch.zeros(0, 4), return_logits=return_logits)
        got = onnx_predictor.predict_torch(None, None, torch.zeros(0, 4), return_logits=return_logits)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
