"""``slimseg segment`` end to end on a tiny random model: outputs, inputs and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, random_tiny_model
from PIL import Image
from typer.testing import CliRunner

import slimseg
from slimseg.cli.app import app
from slimseg.inference.masks import decode_rle

runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return slimseg.save_model(random_tiny_model(7), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo(120, 160, seed=1)).save(folder / "a.jpg")
    Image.fromarray(photo(90, 70, seed=2)).save(folder / "b.png")
    return folder


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def assert_one_line_error(result, *fragments: str, code: int | None = None) -> None:
    assert result.exit_code != 0 if code is None else result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_the_subcommands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("prune", "distill", "segment", "segevery", "eval-coco", "export", "bench"):
        assert name in result.stdout


def test_segment_help_matches_the_reference():
    """docs/cli.md's options: --backend, mps among the devices, a batch of images (not crops)."""
    result = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "--backend <torch|onnx>" in text and "[default: torch]" in text
    assert "cpu, cuda, cuda:N or mps" in text
    assert "Images embedded together in one encoder pass" in text and "crops" not in text


def test_global_threads_option_sets_torch_threads(model_path, images):
    result = invoke("--threads", "1", "segment", images / "a.jpg", "-m", model_path, "-b", "10,20,100,90")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1  # the conftest fixture sets 2 again for the next test
    result = runner.invoke(app, ["models"], env={"SLIMSEG_THREADS": "2"})
    assert result.exit_code == 0 and torch.get_num_threads() == 2
    result = invoke("--threads", "0", "models")
    assert result.exit_code == 2 and "--threads" in result.stderr


def test_version_and_module_entry_point():
    completed = subprocess.run([sys.executable, "-m", "slimseg", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == f"slimseg {slimseg.__version__}"


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--runs", "0"], "'--runs'"),
    (["segment", "a.jpg", "--format", "tflite"], "'--format'"),
    (["no-such-command"], "No such command"),
    (["segment", "a.jpg", "-b", "0,0,5,5", "--device", "gpu"], "unknown device 'gpu'"),
    (["segment", "a.jpg", "-b", "0,0,5,5", "--dtype", "float64"], "unknown dtype 'float64'"),
    # the options come before the inputs: a missing image does not hide a mistyped option
    (["segment", "missing.jpg", "-b", "0,0,5,5", "--device", "gpu"], "unknown device 'gpu'"),
    (["segevery", "missing.jpg", "--dtype", "float64"], "unknown dtype 'float64'"),
    # a message that lists its choices one per line still prints as one line
    (["eval-coco", "--coco-root", "."], "Missing option '--prompt'. Choose from: box, point,"),
])
def test_a_malformed_command_line_is_one_line_and_exit_status_2(argv, fragment, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"checked only once the command line is")
    completed = subprocess.run([sys.executable, "-m", "slimseg", *argv], capture_output=True, text=True, cwd=tmp_path,
                               env={**os.environ, "SLIMSEG_OFFLINE": "1"})
    assert completed.returncode == 2, completed.stderr
    (line,) = completed.stderr.splitlines()
    assert line.startswith("slimseg: error: ") and fragment in line and completed.stdout == ""


def test_box_prompt_gives_a_json_line_matching_the_predictor(model_path, images):
    result = invoke("segment", images / "a.jpg", "--model", model_path, "--box", "10,20,100,90", "--device", "cpu")
    assert result.exit_code == 0, result.output
    (record,) = records(result.stdout)
    assert (record["image"], record["width"], record["height"]) == (str(images / "a.jpg"), 160, 120)
    (mask_record,) = record["masks"]
    mask = decode_rle(mask_record["segmentation"])
    assert mask.shape == (120, 160) and mask_record["area"] == int(mask.sum())
    assert record["prompts"] == [{"box": [10.0, 20.0, 100.0, 90.0]}]

    predictor = slimseg.Predictor(slimseg.load_model(model_path, device="cpu"))
    predictor.set_image(np.asarray(Image.open(images / "a.jpg").convert("RGB")))
    masks, scores, _ = predictor.predict(box=np.array([10, 20, 100, 90]), multimask_output=False)
    np.testing.assert_array_equal(mask, masks[0])
    assert mask_record["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_bfloat16_gives_nearly_the_float32_mask(model_path, images):
    records = [json.loads(invoke("segment", images / "a.jpg", "-m", model_path, "-b", "10,20,100,90", "--dtype", dtype,
                                 "--device", "cpu").stdout) for dtype in ("float32", "bfloat16")]
    full, low = (decode_rle(record["masks"][0]["segmentation"]) for record in records)
    assert (full != low).mean() < 0.05
    assert abs(records[0]["masks"][0]["score"] - records[1]["masks"][0]["score"]) < 0.05


def test_multimask_points_and_several_boxes_in_one_run(model_path, images):
    result = invoke("segment", images / "a.jpg", "-m", model_path, "--point", "50,50", "--point", "80,60,0",
                    "--multimask", "-d", "cpu")
    assert result.exit_code == 0, result.output
    masks = records(result.stdout)[0]["masks"]
    assert [m["candidate"] for m in masks] == [0, 1, 2]
    assert masks[0]["score"] >= masks[1]["score"] >= masks[2]["score"]
    result = invoke("segment", images / "a.jpg", "-m", model_path, "-b", "0,0,50,50", "-b", "60,60,150,110")
    assert [m["prompt"] for m in records(result.stdout)[0]["masks"]] == [0, 1]


def test_folder_png_output_overlay_and_rle(model_path, images, tmp_path):
    out = tmp_path / "out"
    result = invoke("segment", images, "-m", model_path, "-b", "5,5,60,60", "--out", out, "--overlay")
    assert result.exit_code == 0, result.output
    assert [Path(r["image"]).name for r in records(result.stdout)] == ["a.jpg", "b.png"]
    png = np.asarray(Image.open(out / "a" / "mask_000.png"))
    assert png.shape == (120, 160) and set(np.unique(png)) <= {0, 255}
    assert np.asarray(Image.open(out / "b.overlay.png")).shape == (90, 70, 3)
    result = invoke("segment", images / "b.png", "-m", model_path, "-b", "5,5,60,60", "--out", out, "-f", "rle")
    saved = json.loads((out / "b.json").read_text())
    assert saved["masks"][0]["segmentation"]["size"] == [90, 70]
    # the file is the stdout record without its timing and its own name (docs/cli.md says so)
    (line,) = records(result.stdout)
    assert line.pop("seconds") > 0 and line.pop("output") == str(out / "b.json")
    assert saved == line and list(saved) == ["image", "width", "height", "masks", "prompts"]
    assert not list(out.rglob(".*.tmp"))


def test_records_name_the_files_of_images_whose_names_collide(model_path, tmp_path):
    for folder, seed in (("one", 1), ("two", 2)):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo(40, 50, seed=seed)).save(tmp_path / folder / "a.png")
    out = tmp_path / "out"
    result = invoke("segment", tmp_path / "one", tmp_path / "two", "-m", model_path, "-b", "5,5,30,30", "--out", out,
                    "-f", "rle", "--overlay")
    assert result.exit_code == 0, result.output
    first, second = records(result.stdout)
    assert (first["output"], second["output"]) == (str(out / "a.json"), str(out / "a_2.json"))
    assert second["overlay"] == str(out / "a_2.overlay.png")
    assert json.loads(Path(second["output"]).read_text())["image"] == str(tmp_path / "two" / "a.png")
    result = invoke("segment", tmp_path / "one", tmp_path / "two", "-m", model_path, "-b", "5,5,30,30", "--out", out)
    assert [Path(r["masks"][0]["file"]).parent.name for r in records(result.stdout)] == ["a", "a_2"]


def test_paths_from_stdin_and_prompts_file(model_path, images, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.jpg": [{"box": [1, 2, 50, 60]}, {"points": [[20, 30], [40, 40, 0]]}],
                                   "b.png": [{"box": [0, 0, 30, 30], "points": [[10, 10, 1]]}]}))
    listing = f"{images / 'a.jpg'}\n\n# comment\n{images / 'b.png'}\n"
    result = invoke("segment", "-", "-m", model_path, "--prompts", prompts, input=listing)
    assert result.exit_code == 0, result.output
    first, second = records(result.stdout)
    assert len(first["masks"]) == 2 and len(second["masks"]) == 1
    assert second["prompts"] == [{"points": [[10.0, 10.0, 1]], "box": [0.0, 0.0, 30.0, 30.0]}]


def test_null_separated_paths_from_stdin(model_path, images, tmp_path):
    """find -print0 | slimseg segment - -0: names with newlines or edge spaces come through."""
    (images / "a.jpg").rename(images / "two\nlines.jpg")
    (images / "b.png").rename(images / " padded.png")
    listing = f"{images / 'two'}\nlines.jpg\0{images / ' padded.png'}\0".encode()
    result = runner.invoke(app, ["segment", "-", "-0", "-m", str(model_path), "-b", "0,0,30,30"], input=listing)
    assert result.exit_code == 0, result.output
    assert [Path(r["image"]).name for r in records(result.stdout)] == ["two\nlines.jpg", " padded.png"]


def test_null_separated_input_needs_stdin_and_nul_characters(model_path, images):
    result = invoke("segment", images / "a.jpg", "--null", "-m", model_path, "-b", "0,0,30,30")
    assert_one_line_error(result, "--null applies to paths read from standard input", code=2)
    result = invoke("segment", "-", "--null", "-m", model_path, "-b", "0,0,30,30",
                    input=f"{images / 'a.jpg'}\n{images / 'b.png'}\n")
    assert_one_line_error(result, "no NUL characters", "find -print0", code=2)


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_an_image_without_prompts_fails_alone_before_it_is_read(model_path, images, tmp_path, batch_size):
    """Its error is the missing prompts, not its unreadable bytes, and the images around it
    are segmented as usual, batched or not."""
    (images / "b.png").write_bytes(b"not a png at all")
    Image.fromarray(photo(50, 60, seed=3)).save(images / "c.jpg")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.jpg": [{"box": [1, 2, 50, 60]}], "c.jpg": [{"box": [0, 0, 30, 30]}]}))
    result = invoke("segment", images, "-m", model_path, "--prompts", prompts, "--batch-size", batch_size)
    assert result.exit_code == 1
    assert [Path(record["image"]).name for record in records(result.stdout)] == ["a.jpg", "c.jpg"]
    assert "b.png: no prompts for this image in the prompts file" in result.stderr
    assert "1 of 3 image(s) failed" in result.stderr and "Traceback" not in result.stderr


def test_odd_images_are_handled(model_path, tmp_path):
    grey16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    Image.fromarray(photo(40, 50)).convert("RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(photo(40, 50)).convert("L").save(tmp_path / "grey.png")
    result = invoke("segment", tmp_path, "-m", model_path, "-b", "0,0,30,30")
    assert result.exit_code == 0, result.output
    assert len(records(result.stdout)) == 3


def test_corrupt_image_in_folder_is_reported_and_the_rest_processed(model_path, images):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    result = invoke("segment", images, "-m", model_path, "-b", "0,0,30,30")
    assert result.exit_code == 1
    assert len(records(result.stdout)) == 2
    assert "broken.jpg" in result.stderr and "1 of 3 image(s) failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_box_sticking_out_is_clipped_and_point_outside_is_refused(model_path, images):
    result = invoke("segment", images / "b.png", "-m", model_path, "-b", "-10,-5,500,500")
    assert result.exit_code == 0
    assert records(result.stdout)[0]["prompts"] == [{"box": [0.0, 0.0, 70.0, 90.0]}]
    assert '"prompts": [{"box": [0.0, 0.0, 70.0, 90.0]}]' in result.stdout  # floats, as unclipped boxes are
    result = invoke("segment", images / "b.png", "-m", model_path, "-p", "500,10")
    assert_one_line_error(result, "b.png", "outside the 70x90 image")


@pytest.mark.parametrize(
    "args, fragments, code",
    [
        (["missing.jpg", "-b", "0,0,5,5"], ["missing.jpg", "no such file"], 1),
        (["IMG", "-b", "1,2,3"], ["malformed --box", "'1,2,3'"], 2),
        (["IMG", "-b", "5,5,1,1"], ["x1 > x0"], 2),
        (["IMG", "-p", "1,x"], ["malformed --point"], 2),
        (["IMG", "-p", "1,2,7"], ["label must be 1"], 2),
        (["IMG"], ["no prompts"], 2),
        (["IMG", "-b", "0,0,5,5", "--model", "sam-z"], ["sam-z", "neither a registered model"], 1),
        (["IMG", "-b", "0,0,5,5", "--device", "tpu"], ["unknown device 'tpu'"], 2),
        (["IMG", "-b", "0,0,5,5", "--device", "cuda:7"], ["cuda:7"], 1),
        (["IMG", "-b", "0,0,5,5", "--format", "png"], ["--out"], 2),
        (["IMG", "-b", "0,0,5,5", "--overlay"], ["--out"], 2),
        (["IMG", "-b", "0,0,5,5", "-p", "1,1", "-b", "1,1,4,4"], ["ambiguous"], 2),
        (["IMG", "--prompts", "nope.json"], ["nope.json"], 1),
        (["IMG", "-b", "0,0,5,5", "--dtype", "float64"], ["unknown dtype 'float64'"], 2),
        (["IMG", "-b", "0,0,5,5", "--dtype", "bfloat16", "--backend", "onnx"], ["--dtype applies to --backend torch"], 2),
    ],
)
def test_bad_input_gives_one_clear_line(model_path, images, args, fragments, code):
    args = [str(images / "a.jpg") if a == "IMG" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(model_path)]
    result = invoke("segment", *args)
    assert_one_line_error(result, *fragments, code=code)


def test_unreadable_image_alone_fails(model_path, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = invoke("segment", bad, "-m", model_path, "-b", "0,0,5,5")
    assert result.exit_code == 1 and "bad.png" in result.stderr and "Traceback" not in result.stderr


def test_cli_process_has_no_traceback_for_bad_model(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "slimseg", "segment", str(tmp_path), "-b", "0,0,5,5", "-m",
                                "nope"], capture_output=True, text=True)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_output_folder_that_is_a_file_is_refused_before_the_model_loads(images, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    # an unknown model proves the check comes first: its error would be exit status 1
    for fmt in ("png", "rle"):
        result = invoke("segment", images / "a.jpg", images / "b.png", "-m", "sam-z", "-b", "0,0,30,30",
                        "--out", blocker, "-f", fmt)
        assert_one_line_error(result, f"--out {blocker} is a file: give a folder", code=2)
    assert blocker.read_text() == "a file where the output folder should be"


def test_unwritable_output_is_reported_per_image(model_path, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where a's mask folder should be")
    result = invoke("segment", images / "a.jpg", images / "b.png", "-m", model_path, "-b", "0,0,30,30", "--out", out)
    assert result.exit_code == 1 and "cannot write output" in result.stderr and "a.jpg" in result.stderr
    assert [Path(r["image"]).name for r in records(result.stdout)] == ["b.png"]
    assert (out / "a").read_text() == "a file where a's mask folder should be"


def test_a_nan_score_is_written_as_null_in_strict_json(tmp_path, images):
    model = random_tiny_model(7)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[2].bias.fill_(float("nan"))
    broken = slimseg.save_model(model, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    result = invoke("segment", images / "a.jpg", "-m", broken, "-b", "10,20,100,90", "--multimask", "-o", out, "-f", "rle")
    assert result.exit_code == 0, result.output

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} is not strict JSON"))

    for record in (strict(result.stdout), strict((out / "a.json").read_text())):
        assert [mask["score"] for mask in record["masks"]] == [None, None, None]


def test_rerun_into_the_same_folder_removes_that_images_stale_masks_only(model_path, images, tmp_path):
    out = tmp_path / "out"
    result = invoke("segment", images, "-m", model_path, "-b", "5,5,60,60", "--multimask", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "a").iterdir()) == ["mask_000.png", "mask_001.png", "mask_002.png"]
    for name in ("mask_0002.png", "mask_2.png", "mask_003.png.bak", "notes.txt"):  # not names we write
        (out / "a" / name).write_text("the user's")
    (out / "a" / "mask_004.png").mkdir()  # not a file
    result = invoke("segment", images / "a.jpg", "-m", model_path, "-b", "5,5,60,60", "--out", out)
    assert result.exit_code == 0, result.output
    (record,) = records(result.stdout)
    assert [Path(mask["file"]).name for mask in record["masks"]] == ["mask_000.png"]
    assert sorted(p.name for p in (out / "a").iterdir()) == [
        "mask_000.png", "mask_0002.png", "mask_003.png.bak", "mask_004.png", "mask_2.png", "notes.txt"]
    assert len(list((out / "b").iterdir())) == 3  # another image's folder is left alone


def test_a_missing_file_fails_alone_like_a_corrupt_one(model_path, images, tmp_path):
    (images / "corrupt.png").write_bytes(b"not a png at all")
    missing = images / "nonexist.png"
    result = invoke("segment", images / "corrupt.png", missing, images / "a.jpg", "-m", model_path, "-b", "0,0,30,30")
    assert result.exit_code == 1
    assert [Path(r["image"]).name for r in records(result.stdout)] == ["a.jpg"]
    assert f"slimseg: error: {missing}: no such file or directory" in result.stderr.splitlines()
    assert "2 of 3 image(s) failed" in result.stderr and "Traceback" not in result.stderr
    listing = f"{images / 'a.jpg'}\n{missing}\n{images / 'b.png'}\n"
    result = invoke("segment", "-", "-m", model_path, "-b", "0,0,30,30", input=listing)
    assert result.exit_code == 1
    assert [Path(r["image"]).name for r in records(result.stdout)] == ["a.jpg", "b.png"]
    assert f"{missing}: no such file or directory" in result.stderr


def test_a_prompts_file_without_prompts_or_with_malformed_content_exits_2(model_path, images, tmp_path):
    prompts = tmp_path / "pp.json"
    for content in ("[]", "{}", '{"a.jpg": []}'):
        prompts.write_text(content)
        result = invoke("segment", images / "a.jpg", "-m", model_path, "--prompts", prompts)
        assert_one_line_error(result, f"{prompts}: the prompts file holds no prompts", code=2)
    prompts.write_text('[{"points": [[10, 20]], "labels": [0]}]')
    result = invoke("segment", images / "a.jpg", "-m", model_path, "--prompts", prompts)
    assert_one_line_error(result, f"{prompts}[0]: unknown key 'labels'", code=2)


def _run_with_terminal_stderr(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``python -m slimseg ARGV`` with stderr on a pseudo-terminal (progress bars drawn) and
    stdout on a pipe; returns the exit status, stdout and what the terminal showed."""
    import os
    import pty

    leader, follower = pty.openpty()
    environment = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    process = subprocess.Popen([sys.executable, "-m", "slimseg", *argv], stdout=subprocess.PIPE, stderr=follower,
                               cwd=cwd, env=environment, text=True)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        shown += chunk
    stdout = process.stdout.read()
    os.close(leader)
    return process.wait(), stdout, shown.decode(errors="replace")


def test_records_reach_stdout_while_a_progress_bar_is_on_the_terminal(model_path, images, tmp_path):
    status, stdout, shown = _run_with_terminal_stderr(
        ["segment", str(images), "-b", "2,2,20,20", "-m", str(model_path), "--device", "cpu"], tmp_path)
    assert status == 0, shown
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == len(list(images.iterdir())) and all(line["masks"] for line in lines)
    assert '"masks"' not in shown


def test_a_closed_pipe_ends_the_run_quietly(model_path, images, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for index in range(8):  # the reader is gone long before the last records are written
        (many / f"{index}.jpg").write_bytes((images / "a.jpg").read_bytes())
    command = (f"{sys.executable} -m slimseg segment {many} -b 2,2,20,20 -m {model_path} --device cpu "
               f"| head -c 1 > /dev/null")
    completed = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True,
                               cwd=tmp_path)
    assert "error" not in completed.stderr and "Traceback" not in completed.stderr, completed.stderr


def test_a_line_break_in_a_file_name_keeps_its_error_on_one_line(model_path, tmp_path):
    bad = tmp_path / "bad\nname.jpg"
    bad.write_bytes(b"not an image")
    result = invoke("segment", bad, "-b", "0,0,5,5", "-m", model_path, "--device", "cpu")
    assert_one_line_error(result, "bad\\nname.jpg", code=1)
