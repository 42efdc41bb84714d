"""``slimseg export``: a model → verified ONNX graphs (+ manifest) or slimseg safetensors."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from slimseg.cli.common import ModelOption, OfflineOption, check_output_path, console, user_errors
from slimseg.errors import UsageError


class ExportFormat(str, Enum):
    onnx = "onnx"
    safetensors = "safetensors"


class Quantization(str, Enum):
    int8 = "int8"


def _print_report(manifest: dict) -> None:
    """Per variant, the largest relative and absolute difference from torch over all cases."""
    verification = manifest["verification"]
    for variant, cases in verification["diffs"].items():
        worst_case, worst = max(((f"{case}/{output}", diff) for case, outputs in cases.items()
                                 for output, diff in outputs.items()), key=lambda item: item[1]["rel"])
        tolerance = verification["tolerance_rel"].get(variant)
        limit = f" (tolerance {tolerance:.0e})" if tolerance else " (no tolerance: see mask IoU)"
        console.print(f"{variant:8s} max difference from torch: {worst['rel']:.2e} relative, "
                      f"{worst['max_abs']:.2e} absolute, in {worst_case}{limit}")
    if "int8_mask_iou" in verification:
        console.print(f"int8     mean mask IoU against torch float32: {verification['int8_mask_iou']:.4f}")


def export(
    model: ModelOption = "sam-b",
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx: image encoder, prompt encoder + mask decoder (and AutoPPN for lite-sam) as ONNX graphs with a slimseg.json manifest, verified in onnxruntime; safetensors: slimseg's own checkpoint format.")] = ExportFormat.onnx,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder to write (created, or filled if empty; an earlier export there, ONNX or safetensors, is replaced if it holds only what slimseg wrote; any other non-empty folder is refused).", show_default=False)] = ...,  # type: ignore[assignment]
    opset: Annotated[Optional[int], typer.Option("--opset", metavar="N", help="ONNX opset, 14 to 20 (default 17).", show_default=False)] = None,
    quantize: Annotated[Optional[Quantization], typer.Option("--quantize", help="Also write int8 graphs (onnxruntime dynamic quantisation of MatMul/Gemm weights) and make them the default.", show_default=False)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write float16 graphs (the decoder keeps float32 inputs and outputs).")] = False,
    uint8_input: Annotated[bool, typer.Option("--uint8-input", help="The image encoder takes the resized 0-255 uint8 image and normalises and pads it in the graph.")] = False,
    offline: OfflineOption = False,
) -> None:
    """Export a model for deployment: ONNX graphs verified against torch, or safetensors.

    Prints one JSON line (what was written) on stdout and, for ONNX, the verification figures on stderr.
    """
    with user_errors():
        if fmt is ExportFormat.safetensors:
            for given, name in ((opset is not None, "--opset"), (quantize is not None, "--quantize"),
                                (fp16, "--fp16"), (uint8_input, "--uint8-input")):
                if given:
                    raise UsageError(f"{name} applies to --format onnx only")
            from slimseg.export.folders import check_out_folder, export_safetensors

            check_output_path(out, folder=True)
            check_out_folder(out)  # before the checkpoint is read (or downloaded)
            sys.stdout.write(json.dumps(export_safetensors(model, out, offline=offline)) + "\n")
            return

        from slimseg.export.onnx import DEFAULT_OPSET, check_opset, check_out_folder, export_onnx, require_export_extra
        from slimseg.zoo import load_model

        # every cheap check before the model is read
        require_export_extra()
        check_opset(opset if opset is not None else DEFAULT_OPSET)
        check_output_path(out, folder=True)
        check_out_folder(out)
        loaded = load_model(model, device="cpu", offline=offline)
        console.print(f"exporting {model} to {out} (opset {opset or DEFAULT_OPSET}) and verifying in onnxruntime ...")
        manifest = export_onnx(loaded, out, opset=opset or DEFAULT_OPSET, quantize=quantize.value if quantize else None,
                               fp16=fp16, uint8_input=uint8_input, source=model)
        _print_report(manifest)
        files = sorted(name for variant in manifest["variants"].values() for name in variant.values())
        sys.stdout.write(json.dumps({"source": model, "format": "onnx", "out": str(out),
                                     "files": [*files, "slimseg.json"], "default_variant": manifest["default_variant"],
                                     "seconds": manifest["seconds"]}) + "\n")
