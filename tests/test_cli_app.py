"""The ``slimseg`` entry point: the package imports lightly, Ctrl-C while torch loads is one
line, and the help shows value placeholders only where a value is taken."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from slimseg.cli.app import app

runner = CliRunner()
COMMANDS = ("segment", "segevery", "prune", "distill", "train", "models", "info", "convert", "export",
            "eval-coco", "bench")


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_importing_slimseg_leaves_torch_until_a_public_name_is_used():
    completed = _run_python("""
        import sys
        import slimseg
        assert "torch" not in sys.modules, "torch imported with the package"
        assert {"Predictor", "build_model", "SlimsegError"} <= set(dir(slimseg))
        from slimseg import MaskGenerator, Predictor, Sam, SamConfig, build_model, load_model
        assert "torch" in sys.modules and slimseg.Predictor is Predictor
        assert slimseg.zoo.load_model is load_model  # subpackages are reached through the package
        try:
            slimseg.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise SystemExit("no AttributeError")
    """)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("module", ["slimseg.modeling.autoppn", "slimseg.modeling.litevit", "slimseg.zoo",
                                    "slimseg.modeling.lite_sam", "slimseg.export.runtime"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """The package no longer imports everything up front, so no import order hides a cycle."""
    completed = _run_python(f"import {module}")
    assert completed.returncode == 0, completed.stderr


def test_ctrl_c_while_torch_loads_is_one_line_and_status_130():
    # a KeyboardInterrupt raised by the import of torch is what Ctrl-C in those seconds gives
    completed = _run_python("""
        import sys

        class InterruptTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, InterruptTorch())
        sys.argv = ["slimseg", "info", "sam-b"]
        from slimseg.cli import main
        main()
    """)
    assert completed.returncode == 130
    assert completed.stderr == "slimseg: error: interrupted\n"


def test_ctrl_c_while_a_command_imports_its_modules_is_status_130(tmp_path):
    # prune imports the distillation code before its error handling begins
    completed = _run_python(f"""
        import sys

        class InterruptDistill:
            def find_spec(self, name, path=None, target=None):
                if name == "slimseg.compress.distill":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, InterruptDistill())
        sys.argv = ["slimseg", "prune", "--model", "sam-b", "--ratio", "0.5", "--data", "{tmp_path}",
                    "--out", "{tmp_path / 'p.safetensors'}"]
        from slimseg.cli import main
        main()
    """)
    assert completed.returncode == 130, completed.stderr
    assert completed.stderr.strip() == "slimseg: error: interrupted"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_placeholder_for_flags_or_arguments(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for placeholder in ("<bool>", "<list[str]>", "<str>"):
        assert placeholder not in result.stdout, f"{command}: {placeholder}"


def test_top_level_help_has_no_flag_placeholders():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "<bool>" not in result.stdout and "--threads" in result.stdout


def test_choice_options_show_the_values_they_accept():
    from slimseg.compress.losses import ALIGN_CHOICES
    from slimseg.compress.slimming import SLIMMING_IMPORTANCES, STAGE_CHOICES
    from slimseg.compress.train import TRAIN_STAGES

    expected = {"prune": [("--mode", ("local", "global")), ("--stage", STAGE_CHOICES),
                          ("--importance", SLIMMING_IMPORTANCES)],
                "distill": [("--align", ALIGN_CHOICES)], "train": [("--stage", TRAIN_STAGES)]}
    for command, options in expected.items():
        text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"}).stdout.split())
        for option, values in options:
            assert f"{option} {'|'.join(values)} " in text, (command, option)


def test_each_command_summary_is_one_line():
    """typer keeps the line breaks of a docstring's first paragraph in the command list."""
    lines = runner.invoke(app, ["--help"], env={"COLUMNS": "300"}).stdout.splitlines()
    start = next(index for index, line in enumerate(lines) if "Commands" in line)
    rows = [line.strip("│ ").split()[0] for line in lines[start + 1:] if line.startswith("│")]
    assert rows == list(COMMANDS)
