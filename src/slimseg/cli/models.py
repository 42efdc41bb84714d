"""``slimseg models``, ``slimseg info`` and ``slimseg convert``: the model zoo from the shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table

from slimseg.cli.common import OfflineOption, check_output_path, user_errors
from slimseg.errors import UsageError
from slimseg.zoo.info import describe, registry_rows
from slimseg.zoo.loading import convert_checkpoint

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
JsonListOption = Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per model, instead of "
                                                             "a table.")]


def _stdout() -> Console:
    # made per command, so that COLUMNS (read when a Console is made) is the current one
    return Console(soft_wrap=True, highlight=False)


def _millions(value: int | None) -> str:
    return "from file" if value is None else f"{value / 1e6:.2f} M"


def _encoder_line(arch: dict) -> str:
    if arch["family"] != "sam":
        encoder = arch["config"].get("litevit", {})
        return f"encoder     {arch['family']}: LiteViT dims {encoder.get('dims')}, depths {encoder.get('depths')}"
    return (f"encoder     embed {arch['embed_dim']}, {arch['depth']} blocks, global attention in "
            f"{arch['global_attn_indexes']}")


def _models_table(rows: list[dict], with_licence: bool) -> Table:
    # A name is what the user types next (`--model NAME`), so it must survive a narrow
    # terminal or a pipe (80 columns) whole: never wrapped, never cut with an ellipsis. The
    # origin wraps at spaces; its longest word sets its least width, so no word is split.
    # No vertical rules: at 80 columns every character goes to the text.
    name = Column("name", no_wrap=True, min_width=max((len(row["name"]) for row in rows), default=4))
    origin = Column("weights from", min_width=max((len(word) for row in rows for word in row["origin"].split()),
                                                  default=4))
    columns = [name, "parameters", "input", "cached", *(["licence"] if with_licence else []), origin]
    table = Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for row in rows:
        table.add_row(row["name"], _millions(row["parameters"]),
                      f"{row['input_size']} px" if row["input_size"] else "from file",
                      "yes" if row["cached"] else "no", *([row["license"]] if with_licence else []), row["origin"])
    return table


def models(as_json: JsonListOption = False) -> None:
    """List the registered models: parameters, input size, weight source, licence, cache state."""
    with user_errors():
        rows = registry_rows()
        if as_json:
            sys.stdout.write(json.dumps(rows) + "\n")
            return
        console = _stdout()
        table = _models_table(rows, with_licence=True)
        licences = sorted({row["license"] for row in rows})
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        if len(licences) == 1 and natural > console.width:
            # a narrow terminal: one line below instead of a column that repeats one value
            console.print(_models_table(rows, with_licence=False))
            console.print(f"licence: {licences[0]} (every model)")
            return
        console.print(table)


def info(
    model: Annotated[str, typer.Argument(metavar="NAME|PATH", help="Registered model name or checkpoint file/folder.")],
    as_json: JsonOption = False,
) -> None:
    """Format, architecture with widths per block, parameters per part, MACs and sha256 of a model."""
    with user_errors():
        report = describe(model)
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
            return
        parameters, macs, arch = report["parameters"], report["macs"], report["architecture"]
        lines = [
            f"model       {report['model']}",
            f"format      {report['format']}",
            f"path        {report['path'] or '-'}",
            f"sha256      {report['sha256'] or '-'}",
            f"input       {report['input_size']} x {report['input_size']} px",
            _encoder_line(arch),
            "parameters  " + ", ".join(f"{part} {_millions(count)}" for part, count in parameters.items()),
            f"MACs        image encoder {macs['image_encoder']['layers'] / 1e9:.2f} G in conv/linear layers "
            f"+ {macs['image_encoder']['attention'] / 1e9:.2f} G attention; decoder "
            f"{macs['decoder_per_prompt'] / 1e9:.2f} G per prompt",
        ]
        _stdout().print("\n".join(lines))
        if not arch["blocks"]:
            return
        table = Table("block", "heads", "q/k width", "v width", "MLP width", "attention")
        for index, block in enumerate(arch["blocks"]):
            window = "global" if block["window"] == "global" else f"window {block['window']}"
            table.add_row(str(index), str(block["heads"]), str(block["qk_dim"]), str(block["v_dim"]),
                          str(block["mlp_dim"]), window)
        _stdout().print(table)


def convert(
    source: Annotated[str, typer.Argument(metavar="NAME|PATH", help="Registered model name or checkpoint file/folder in any supported format.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Where to write slimseg safetensors (.safetensors).", show_default=False)],
    offline: OfflineOption = False,
) -> None:
    """Convert any supported checkpoint to slimseg safetensors (architecture in the metadata)."""
    with user_errors():
        if out.suffix != ".safetensors":
            raise UsageError(f"--out {out}: the file name must end in .safetensors")
        check_output_path(out, folder=False)  # before the checkpoint is read (or downloaded)
        sys.stdout.write(json.dumps(convert_checkpoint(source, out, offline=offline)) + "\n")
