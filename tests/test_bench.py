"""``slimseg bench`` and ``slimseg.benchmark`` on tiny models: every stage, the floor, bad input."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import photo, tiny_config
from PIL import Image
from test_train import tiny_lite_sam_config
from typer.testing import CliRunner

import slimseg
from slimseg.benchmark import BenchSettings, PeakMemory, compile_model, floor_seconds, matmul_rate, model_work, run_bench, time_alternating, time_runs
from slimseg.benchmark.memory import PROCESS_RSS, STAGE_RSS
from slimseg.cli.app import app
from slimseg.errors import SlimsegError
from slimseg.modeling.sam.native_attention import native_kernel_status

runner = CliRunner()
CPU = ["--device", "cpu", "--threads", "2"]
FAST = ["--runs", "1", "--warmup", "0", "--points-per-side", "4", "--prompts", "4"]
FLOORED = ("encoder", "encoder_batch", "decoder_batch")


@pytest.fixture(scope="module")
def sam_path(tmp_path_factory) -> Path:
    return slimseg.save_model(slimseg.build_model(tiny_config()), tmp_path_factory.mktemp("sam") / "tiny.safetensors")


@pytest.fixture(scope="module")
def lite_sam_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lite")
    return slimseg.save_model(slimseg.build_model(tiny_lite_sam_config()), folder / "lite.safetensors")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.fromarray(photo(90, 120, seed=2)).save(path)
    return path


def _bench(*args) -> object:
    return runner.invoke(app, ["bench", *map(str, args)])


def _check_stages(report: dict, expected: set[str]) -> None:
    assert set(report["stages"]) == expected
    for key, stage in report["stages"].items():
        assert stage["median_s"] > 0 and all(seconds > 0 for seconds in stage["seconds"]), key
        assert stage["rate"] > 0 and stage["peak_memory_bytes"] > 0, key
        if key in FLOORED:
            assert 0 < stage["floor_fraction"] <= 1.5 and stage["floor_s"] > 0, key
        else:
            assert stage["floor_s"] is None, key


def test_cli_measures_every_stage_of_a_sam(sam_path, tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("-m", sam_path, *CPU, *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    _check_stages(report, {"encoder", "decoder_batch", "box_prompt", "segevery_grid"})
    assert set(report["stages"]["segevery_grid"]["parts_median_s"]) == {"encoder", "decoder", "postprocess"}
    assert report["stages"]["decoder_batch"]["prompts"] == report["model"]["decoder_prompts"] == 4
    assert report["model"]["name"] == str(sam_path) and not report["model"]["autoppn"]
    assert report["machine"]["device"] == "cpu" and report["machine"]["threads"] == 2
    assert report["machine"]["torch"] == torch.__version__ and report["matmul"]["flops_per_second"] > 0
    assert report["machine"]["attention_kernel"] == native_kernel_status()
    for text in ("image encoder", "SegEvery grid 4x4", "of floor", "torch " + torch.__version__,
                 "relative-position attention"):
        assert text in result.stdout
    assert "bench: image encoder" in result.stderr  # progress, one line per stage


def test_cli_adds_the_autoppn_row_for_lite_sam_and_reads_the_image(lite_sam_path, image_path, tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("-m", lite_sam_path, *CPU, *FAST, "--image", image_path, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    _check_stages(report, {"encoder", "decoder_batch", "box_prompt", "segevery_grid", "segevery_autoppn"})
    assert "proposer" in report["stages"]["segevery_autoppn"]["parts_median_s"]
    assert report["stages"]["box_prompt"]["image"] == [90, 120] and report["image"] == str(image_path)
    assert report["model"]["family"] == "lite-sam" and report["model"]["autoppn"]
    # Lite-SAM has no relative-position attention: no kernel is built or named for it
    assert "attention_kernel" not in report["machine"] and "relative-position" not in result.stdout


def test_no_segevery_batch_and_random_weights_of_a_registered_model(image_path, tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("-m", "lite-sam", "--random-weights", "--no-segevery", "--batch-size", "2", *CPU, *FAST,
                    "--image", image_path, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    _check_stages(report, {"encoder", "encoder_batch", "decoder_batch", "box_prompt"})
    batch, single = report["stages"]["encoder_batch"], report["stages"]["encoder"]
    assert batch["batch"] == 2 and batch["floor_s"] == pytest.approx(2 * single["floor_s"])
    assert batch["rate"] == pytest.approx(2 / batch["median_s"]) and "batch of 2" in result.stdout
    assert report["model"]["random_weights"] and report["model"]["img_size"] == 640


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["--dtype", "float8"], "unknown dtype 'float8'", 2),
        (["--runs", "0"], "--runs", 2),
        (["--runs", "-2"], "--runs", 2),
        (["--warmup", "-1"], "--warmup", 2),
        (["--prompts", "0"], "--prompts", 2),
        (["--points-per-side", "0"], "--points-per-side", 2),
        (["--threads", "0"], "--threads", 2),
        (["--batch-size", "0"], "--batch-size", 2),
        (["--image", "TMP/notes.png"], "cannot read image", 1),
        (["--json", "TMP/missing/out.json"], "--json {TMP}/missing/out.json: folder {TMP}/missing does not exist", 2),
        (["--json", "TMP/missing/deeper/out.json"], "folder {TMP}/missing/deeper does not exist", 2),
        (["--json", "TMP"], "is a folder: give a file name", 2),
        (["--json", "TMP/notes.png/out.json"], "notes.png is a file, not a folder", 2),
        (["--random-weights"], "--random-weights builds a registered model", 2),
        pytest.param(["--device", "cuda"], "CUDA is not available", 1,
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_bad_input_fails_before_measuring_and_writes_nothing(sam_path, tmp_path, args, fragment, code):
    (tmp_path / "notes.png").write_text("not pixels")
    before = sorted(tmp_path.iterdir())
    result = _bench("-m", sam_path, *CPU, *FAST, *(arg.replace("TMP", str(tmp_path)) for arg in args))
    assert result.exit_code == code, result.output
    assert fragment.replace("{TMP}", str(tmp_path)) in result.stderr and "Traceback" not in result.stderr
    assert "bench:" not in result.stderr and not result.stdout.strip()
    assert sorted(tmp_path.iterdir()) == before
    if code == 1 or "--json" in args:  # our own errors are one line; typer's range errors come with the usage
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_json_in_a_missing_folder_is_a_bad_argument_before_the_model_is_read(tmp_path):
    """As for every other output path: exit status 2, one line, before a registered model is
    looked up, downloaded or read, and no folder created (`python -m slimseg`, relative path)."""
    env = {**os.environ, "SLIMSEG_HOME": str(tmp_path / "home"), "SLIMSEG_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-m", "slimseg", "bench", "-m", "slimsam-77", "--device", "cpu",
                                "--json", "nodir2/x.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == "slimseg: error: --json nodir2/x.json: folder nodir2 does not exist"
    assert not completed.stdout and sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["model", "image"])
def test_json_that_is_a_file_the_run_reads_is_refused_before_measuring(sam_path, image_path, tmp_path, target):
    # copies: before the fix the report replaced them, which must not spoil the shared fixtures
    model, image = tmp_path / "model.safetensors", tmp_path / "img.png"
    model.write_bytes(sam_path.read_bytes())
    image.write_bytes(image_path.read_bytes())
    before = {path: path.read_bytes() for path in (model, image)}
    out = model if target == "model" else image
    result = _bench("-m", model, *CPU, *FAST, "--image", image, "--json", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"slimseg: error: --json {out} is a file that this command reads: write the "
                                     "output elsewhere")
    assert "bench:" not in result.stderr and not result.stdout.strip()
    assert {path: path.read_bytes() for path in (model, image)} == before


def test_table_into_a_file_keeps_its_natural_width(sam_path, tmp_path):
    """Not a terminal: rich would fit the table to 80 columns, cutting "median" and wrapping
    values; written to a file, each stage must stay one whole row."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    with (tmp_path / "out.txt").open("w") as stdout:
        completed = subprocess.run([sys.executable, "-m", "slimseg", "bench", "-m", str(sam_path), *CPU, *FAST,
                                    "--no-segevery", "--batch-size", "2"], stdout=stdout, stderr=subprocess.PIPE,
                                   text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    lines = (tmp_path / "out.txt").read_text().splitlines()
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    header = next(line for line in table if line.startswith("┃"))
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == [
        "stage", "median", "throughput", "floor", "of floor", "peak memory"]
    rows = [line for line in table if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == [
        "image encoder", "image encoder, batch of 2", "decoder, 4 points", "box prompt"]
    assert len({len(line) for line in table}) == 1 and len(table[0]) > 80  # wider than rich's default


def test_missing_model_file_is_one_line(tmp_path):
    result = _bench("-m", tmp_path / "nope.safetensors", "--device", "cpu", "--json", tmp_path / "out.json")
    assert result.exit_code == 1 and "nope.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (BenchSettings(dtype="int8"), "unknown dtype"),
        (BenchSettings(runs=0), "runs must be an integer >= 1"),
        (BenchSettings(warmup=-1), "warm-up runs must be an integer >= 0"),
        (BenchSettings(prompts=0), "prompts must be an integer >= 1"),
        (BenchSettings(points_per_side=0), "points_per_side must be an integer >= 1"),
        (BenchSettings(batch_size=0), "batch_size must be an integer >= 1"),
        (BenchSettings(runs=2.5), "runs must be an integer >= 1, got 2.5"),
        (BenchSettings(prompts=True), "prompts must be an integer >= 1, got True"),
    ],
)
def test_library_settings_are_checked(settings, fragment):
    with pytest.raises(SlimsegError, match=fragment):
        settings.check()


def test_run_bench_on_an_image_without_segevery():
    model = slimseg.build_model(tiny_config())
    seen = []
    report = run_bench(model, BenchSettings(runs=2, warmup=0, prompts=3, segevery=False), image=photo(60, 80),
                       on_stage=seen.append)
    assert list(report.stages) == ["encoder", "decoder_batch", "box_prompt"] and len(seen) == 4
    assert all(len(stage.timing.seconds) == 2 for stage in report.stages.values())
    work = model_work(tiny_config(), prompts=3)
    assert report.model["encoder_macs"] == work.encoder_macs > 0
    encoder = report.stages["encoder"]
    assert encoder.floor_seconds == pytest.approx(floor_seconds(work.encoder_macs, report.matmul))
    assert encoder.details["input"] == [1, 3, 192, 256]  # 60x80 resized to the 256 px input
    json.dumps(report.to_dict())  # plain JSON values only


def test_compiled_run_bench_compiles_before_timing():
    model = slimseg.build_model(tiny_config())
    pixels = model.preprocess(torch.rand(1, 3, 192, 256) * 255)
    with torch.no_grad():
        eager = model.image_encoder(pixels)
    try:
        report = run_bench(model, BenchSettings(runs=1, warmup=0, prompts=3, segevery=False, compile=True),
                           image=photo(60, 80))
    except SlimsegError as error:
        if "torch.compile does not work on this machine" in str(error):
            pytest.skip(str(error))
        raise
    assert isinstance(model.image_encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(model.mask_decoder, torch._dynamo.eval_frame.OptimizedModule)
    assert report.settings.effective_warmup == 1 and all(stage.warmup == 1 for stage in report.stages.values())
    with torch.no_grad():
        compiled = model.image_encoder(pixels)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compile_model_refuses_a_missing_part():
    with pytest.raises(SlimsegError, match="cannot compile autoppn"):
        compile_model(slimseg.build_model(tiny_config()), parts=("autoppn",))


def test_decoder_work_grows_with_the_prompts():
    one, many = model_work(tiny_config(), prompts=1), model_work(tiny_config(), prompts=8)
    assert one.encoder_macs == many.encoder_macs
    assert 7 * one.decoder_macs < many.decoder_macs <= 8 * one.decoder_macs


def test_matmul_rate_and_floor():
    rate = matmul_rate(torch.device("cpu"), torch.float32, runs=1, max_size=256)
    assert rate.size == 256 and rate.flops_per_second > 0 and rate.dtype == "float32"
    assert floor_seconds(10**9, rate) == pytest.approx(2e9 / rate.flops_per_second)


def test_time_runs_warms_up_then_times_each_run():
    calls = []
    timing = time_runs(lambda: calls.append(1), torch.device("cpu"), runs=3, warmup=2)
    assert len(calls) == 5 and len(timing.seconds) == 3 and timing.median >= 0
    with pytest.raises(SlimsegError, match="runs must be an integer >= 1"):
        time_runs(lambda: None, torch.device("cpu"), runs=0)


def test_time_alternating_takes_the_works_in_turn():
    calls = []
    first, second = time_alternating([lambda: calls.append("a"), lambda: calls.append("b")],
                                     torch.device("cpu"), runs=2, warmup=1)
    assert calls == ["a", "b"] * 3
    assert len(first.seconds) == len(second.seconds) == 2
    with pytest.raises(SlimsegError, match="warm-up runs must be an integer >= 0"):
        time_alternating([lambda: None], torch.device("cpu"), runs=1, warmup=-1)


def test_peak_memory_sees_a_stage_allocation():
    with PeakMemory(torch.device("cpu")) as quiet:
        pass
    with PeakMemory(torch.device("cpu")) as busy:
        # 64 MiB of fresh pages, touched: an anonymous mapping of its own, since malloc may
        # serve even large blocks from memory the process already holds (slimseg.allocator)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        block.close()
    assert quiet.kind == busy.kind and busy.kind in (STAGE_RSS, PROCESS_RSS)
    if busy.kind == STAGE_RSS:  # the peak was reset in between, so it shows the stage's block
        assert busy.bytes >= quiet.bytes + 48 * 2**20
    else:
        assert busy.bytes >= quiet.bytes > 0


DTYPE_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "dtype_table.py"


def test_dtype_table_prints_a_row_per_model_and_precision(tmp_path):
    out = tmp_path / "table.json"
    completed = subprocess.run(
        [sys.executable, str(DTYPE_TABLE), "--device", "cpu", "--models", "lite-sam", "--dtypes", "float32",
         "--runs", "1", "--warmup", "0", "--no-segevery", "--threads", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    (row,) = [line for line in completed.stdout.splitlines() if line.startswith("| lite-sam |")]
    assert "| float32 |" in row and row.count("|") == 9
    assert json.loads(completed.stdout.splitlines()[-1])["rows"][0]["dtype"] == "float32"
    (report,) = json.loads(out.read_text())["reports"]
    assert report["model"]["name"] == "lite-sam" and report["stages"]["encoder"]["median_s"] > 0


def test_dtype_table_help_and_an_unknown_device():
    completed = subprocess.run([sys.executable, str(DTYPE_TABLE), "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "the table of docs/benchmarks.md's CUDA section, in one command." in \
        " ".join(completed.stdout.split())
    completed = subprocess.run([sys.executable, str(DTYPE_TABLE), "--device", "tpu"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2 and "unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_dtype_table_refuses_an_unknown_model():
    completed = subprocess.run([sys.executable, str(DTYPE_TABLE), "--models", "sam-z", "--device", "cpu"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "sam-z" in completed.stderr and "Traceback" not in completed.stderr


def test_machine_line_names_the_attention_kernel_and_why_not_native():
    from slimseg.benchmark import describe_machine, machine_line
    from slimseg.modeling.sam.native_attention import native_kernels_disabled

    machine = describe_machine(torch.device("cpu"))
    assert machine["attention_kernel"] == native_kernel_status()
    status = machine["attention_kernel"]
    if status.startswith("native"):  # the library's path stays in the JSON
        assert machine_line(machine).endswith(", native relative-position attention")
    else:
        assert machine_line(machine).endswith(", torch relative-position attention " + status.removeprefix("torch "))
    with native_kernels_disabled():
        line = machine_line(describe_machine(torch.device("cpu")))
    assert line.endswith("torch relative-position attention (native kernels disabled)")
    line = machine_line(describe_machine(torch.device("cpu"), torch.bfloat16))
    if status.startswith("native"):  # widened to float32 for the kernel
        assert line.endswith(", bfloat16, native relative-position attention in float32")
    assert native_kernel_status(torch.float64) == "torch (the native kernel takes float32, bfloat16 or float16, not float64)"
    assert "attention_kernel" not in describe_machine(torch.device("meta"))
    assert "attention_kernel" not in describe_machine(torch.device("cpu"), rel_pos_attention=False)
