"""Weight conversion of exported graphs: int8 dynamic quantisation and float16.

onnxruntime's quantisation API has changed across releases (``optimize_model`` was removed,
``QuantType`` members and ``extra_options`` came and went), so the keyword arguments are
chosen from the signature of the installed ``quantize_dynamic`` rather than from a version.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from slimseg.errors import SlimsegError
from slimseg.export.deps import require

# Only MatMul/Gemm: dynamic quantisation of Conv gives ConvInteger, which onnxruntime's CPU
# provider does not implement for every type combination, and it is the attention/MLP
# matmuls that hold nearly all of a ViT's weights.
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_int8(source: Path, target: Path) -> None:
    """Write ``target``: ``source`` with MatMul/Gemm weights dynamically quantised to 8 bits."""
    quantization = require("onnxruntime.quantization", "--quantize int8")
    function = getattr(quantization, "quantize_dynamic", None)
    quant_type = getattr(quantization, "QuantType", None)
    if function is None or quant_type is None:
        raise SlimsegError("this onnxruntime has no quantize_dynamic/QuantType: install onnxruntime>=1.14")
    parameters = inspect.signature(function).parameters
    wanted = {
        "op_types_to_quantize": list(QUANTIZED_OPS),
        "per_channel": False,
        "reduce_range": False,
        # unsigned 8-bit weights, as segment-anything's own export quantises
        "weight_type": getattr(quant_type, "QUInt8", None) or quant_type.QInt8,
        "optimize_model": False,  # older releases only: their graph optimiser broke some models
    }
    options = {key: value for key, value in wanted.items() if key in parameters}
    # onnxruntime logs a pre-processing advice on the root logger for every call
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    function(str(source), str(target), **options)


def convert_float16(source: Path, target: Path, keep_float32_io: bool = False) -> None:
    """Write ``target``: ``source`` with float32 weights and activations in float16, and its
    inputs and outputs too unless ``keep_float32_io``.

    With float32 IO, an input that the graph immediately casts to another exact type (the
    decoder's ``orig_im_size`` → float64) is read directly, not through float16: image sizes
    above 2048 are not exact in float16.
    """
    onnx = require("onnx", "--fp16")
    float16 = require("onnxruntime.transformers.float16", "--fp16")
    model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_float32_io)
    if keep_float32_io:
        _skip_float16_hops(model, onnx.TensorProto.FLOAT16)
    onnx.save(model, str(target))


def _skip_float16_hops(model, float16_type: int) -> None:  # noqa: ANN001 (onnx.ModelProto, optional import)
    """Rewire Cast(input → float16) → Cast(→ T) chains to Cast(input → T) and drop unused casts."""
    inputs = {value.name for value in model.graph.input}
    hops = {node.output[0]: node.input[0] for node in model.graph.node
            if node.op_type == "Cast" and node.input[0] in inputs}
    for node in model.graph.node:
        target_type = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.input[0] in hops and target_type != float16_type:
            node.input[0] = hops[node.input[0]]
    used = {name for node in model.graph.node for name in node.input} | {v.name for v in model.graph.output}
    unused = [node for node in model.graph.node if node.output[0] in hops and node.output[0] not in used]
    for node in unused:
        model.graph.node.remove(node)
