"""``export_onnx``: a model → a folder of ONNX graphs, verified against torch, with a manifest.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
The decoder's output size comes from the *values* of ``orig_im_size``; torch.export (the
dynamo exporter) treats such sizes as unbacked symbols and cannot slice/resize by them
without rewriting the model, while the tracer records them as Shape/Slice/Resize ops with
dynamic sizes. The tracer also keeps the prompt, point and batch axes dynamic through
``dynamic_axes``, which verification checks with sizes (1, 2, 16 prompts; 2 and 4 points;
batch 2) that differ from the trace's. It needs no onnxscript.

The folder appears only once every graph is written and verified: work happens in a
temporary sibling folder that is renamed into place, and removed on any failure.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from slimseg import __version__
from slimseg.errors import SlimsegError, UsageError
from slimseg.export.deps import require
from slimseg.export.folders import check_out_folder, staging_folder
from slimseg.export.graphs import GraphSpec, graph_specs
from slimseg.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, variant_file, write_manifest_text
from slimseg.export.quantize import convert_float16, quantize_int8
from slimseg.export.verify import verify_export
from slimseg.io import atomic_write_text
from slimseg.modeling.sam.sam import PromptableSegmenter

DEFAULT_OPSET = 17
# 14 is the first opset whose Reshape/Trilu/... the tracer needs for every family; 20 is the
# newest the TorchScript exporter writes.
MIN_OPSET, MAX_OPSET = 14, 20


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    return opset


def _io_spec(spec: GraphSpec) -> dict[str, Any]:
    """Shapes (dynamic axes by name) and dtypes of a graph's inputs and outputs."""
    inputs = {
        name: {"shape": [spec.dynamic_axes.get(name, {}).get(i, size) for i, size in enumerate(value.shape)],
               "dtype": str(value.dtype).removeprefix("torch.")}
        for name, value in spec.inputs.items()
    }
    outputs = {name: {"shape": shape, "dtype": "float32"} for name, shape in spec.outputs.items()}
    return {"inputs": inputs, "outputs": outputs}


def _cpu_float_copy(model: PromptableSegmenter) -> PromptableSegmenter:
    """A float32 CPU copy of ``model`` in eval mode, so that the caller's model keeps its
    device, dtype and training mode. Its parameters and buffers are copied straight to the
    CPU (pre-seeded in deepcopy's memo): a copy on the GPU first could run out of memory."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        copied = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, tensor.requires_grad)
        memo[id(tensor)] = copied
    return copy.deepcopy(model, memo).to("cpu").float().eval()


def _io_dtypes(path: Path) -> dict[str, str]:
    """The element types of a written graph's inputs and outputs ({"image": "float16", ...})."""
    onnx = require("onnx", "--format onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    return {value.name: str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
            for value in [*graph.input, *graph.output]}


def _export_graph(spec: GraphSpec, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every Python int it records; the verification step is what
        # proves the dynamic axes right
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, tuple(spec.inputs.values()), str(path), dynamo=False, opset_version=opset,
            input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes,
            do_constant_folding=True,
        )


def _manifest(model: PromptableSegmenter, specs: list[GraphSpec], opset: int, uint8_input: bool) -> dict[str, Any]:
    config = model.config
    autoppn = getattr(model, "autoppn", None)
    embed = model.prompt_encoder
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "slimseg_version": __version__,
        "family": config.to_dict().get("family", "sam"), "model_config": json.loads(config.to_json()),
        "input_size": model.img_size,
        "embedding_shape": [embed.embed_dim, *embed.image_embedding_size],
        "low_res_mask_size": list(embed.mask_input_size),
        "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
        "mask_threshold": model.mask_threshold, "image_format": model.image_format,
        "image_input": "uint8" if uint8_input else "float32",
        "opset": opset, "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__})",
        "graphs": {spec.name: {"file": variant_file(spec.name, "float32"), **_io_spec(spec)} for spec in specs},
        "autoppn": ({"top_k": autoppn.config.top_k, "score_threshold": autoppn.config.score_threshold}
                    if autoppn is not None else None),
    }


def export_onnx(
    model: PromptableSegmenter,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    fp16: bool = False,
    uint8_input: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` into the folder ``out`` and return its manifest.

    Writes image_encoder.onnx, decoder.onnx (and autoppn.onnx for Lite-SAM) in float32, plus
    ``*.int8.onnx`` with ``quantize="int8"`` and ``*.float16.onnx`` with ``fp16``, and
    slimseg.json. Every variant is run in onnxruntime and compared with torch (see
    slimseg.export.verify); a variant past its tolerance raises SlimsegError and leaves no folder.
    A float32 CPU copy of ``model`` is exported: ``model`` keeps its device, dtype and mode.
    """
    require("onnx", "--format onnx")
    require("onnxruntime", "--format onnx (verification)")
    check_opset(opset)
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize!r} is not supported: the only choice is int8")
    out = Path(out)
    check_out_folder(out)
    model = _cpu_float_copy(model)
    specs = graph_specs(model, uint8_input)
    started = time.perf_counter()
    with staging_folder(out) as staging:
        variants: dict[str, dict[str, str]] = {"float32": {}}
        for spec in specs:
            path = staging / variant_file(spec.name, "float32")
            _export_graph(spec, path, opset)
            variants["float32"][spec.name] = path.name
            if quantize == "int8":
                variants.setdefault("int8", {})[spec.name] = variant_file(spec.name, "int8")
                quantize_int8(path, staging / variants["int8"][spec.name])
            if fp16:
                # the decoder keeps float32 IO: pixel coordinates and image sizes above 2048
                # are not exact in float16
                variants.setdefault("float16", {})[spec.name] = variant_file(spec.name, "float16")
                convert_float16(path, staging / variants["float16"][spec.name], keep_float32_io=spec.name == "decoder")
        exported = time.perf_counter()
        verification = verify_export(model, staging, variants, uint8_input)
        manifest = _manifest(model, specs, opset, uint8_input)
        for name, graph in manifest["graphs"].items():
            graph["variants"] = {variant: {"file": files[name], "dtypes": _io_dtypes(staging / files[name])}
                                 for variant, files in variants.items()}
        manifest.update(
            source=source, variants=variants,
            default_variant="int8" if quantize else "float16" if fp16 else "float32",
            verification=verification.to_dict(),
            seconds={"export": round(exported - started, 2), "verify": round(time.perf_counter() - exported, 2)},
        )
        atomic_write_text(staging / MANIFEST_NAME, write_manifest_text(manifest))
    return manifest


def require_export_extra() -> None:
    """Fail early, with the install hint, when onnx or onnxruntime is missing."""
    for module in ("onnx", "onnxruntime"):
        require(module, "--format onnx")


__all__ = ["DEFAULT_OPSET", "SlimsegError", "check_opset", "check_out_folder", "export_onnx", "require_export_extra"]
