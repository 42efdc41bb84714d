"""Running exported graphs with onnxruntime: ``OnnxSam`` (the exported model) and
``OnnxPredictor`` (slimseg's ``Predictor`` API on top of it).

No torch module is built here: onnxruntime computes the embedding, the masks and the AutoPPN
heatmaps. torch tensors are only the containers the Predictor API returns, and the torch
functions reused are SAM's preprocessing (normalise and pad, for float-input encoders) and
AutoPPN's peak picking (``propose_points``), so both backends share that code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError
from slimseg.export.deps import require
from slimseg.export.graphs import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT
from slimseg.export.manifest import read_manifest
from slimseg.inference.predictor import Predictor
from slimseg.modeling.autoppn import PointProposals, propose_points
from slimseg.modeling.sam.prompt_encoder import LABEL_PADDING
from slimseg.modeling.sam.sam import normalize_and_pad, upscale_mask_logits

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
                "tensor(double)": np.float64, "tensor(int64)": np.int64}
# what a graph input or output may be: float32 and float16 are both fine (GraphRunner casts)
_KINDS = {"float": ("tensor(float)", "tensor(float16)"), "uint8": ("tensor(uint8)",)}
Signature = dict[str, tuple[str, list[Any]]]  # name → (kind, dims); None: any size


def _one_line(error: BaseException) -> str:
    """onnxruntime's messages span lines (stack traces included): the gist, on one line."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


class GraphRunner:
    """One onnxruntime session; inputs are cast to the graph's declared types and float
    outputs come back as float32, so callers need not know the variant."""

    def __init__(self, path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        ort = require("onnxruntime", "running exported ONNX files")
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # constant-folding notices about float16 MatMul are not errors
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own exception types
            raise SlimsegError(f"{path}: onnxruntime cannot load it ({_one_line(error)})") from None
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def check(self, inputs: Signature, outputs: Signature, what: str) -> None:
        """Raise one line naming the file unless its inputs and outputs are ``inputs`` and
        ``outputs`` (names and order, element kinds, ranks and static sizes)."""
        for role, expected, actual in (("input", inputs, self.session.get_inputs()),
                                       ("output", outputs, self.session.get_outputs())):
            names = [value.name for value in actual]
            if names != list(expected):
                raise SlimsegError(f"{self.path}: not the {what} the manifest describes: its {role}s are "
                                   f"{', '.join(names)}, expected {', '.join(expected)}")
            for value in actual:
                kind, dims = expected[value.name]
                shape = list(value.shape)
                if (value.type not in _KINDS[kind] or len(shape) != len(dims)
                        or any(isinstance(a, int) and w is not None and a != w for a, w in zip(shape, dims))):
                    want = ", ".join("?" if w is None else str(w) for w in dims)
                    raise SlimsegError(f"{self.path}: not the {what} the manifest describes: {role} {value.name} is "
                                       f"{value.type} {tuple(shape)}, expected {kind} ({want})")

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(np.asarray(inputs[name]).astype(dtype, copy=False))
                for name, dtype in self.input_types.items()}
        try:
            outputs = self.session.run(None, feed)
        except Exception as error:  # onnxruntime's own types (Fail, InvalidArgument, ...)
            raise SlimsegError(f"{self.path}: onnxruntime failed to run it ({_one_line(error)})") from None
        return [out.astype(np.float32) if out.dtype == np.float16 else out for out in outputs]


def providers_for(device: str) -> list[Any]:
    """onnxruntime execution providers for a ``--device`` value: auto → CUDA when this
    onnxruntime has it (onnxruntime-gpu), else CPU; cpu → CPU; cuda[:N] → CUDA or an error."""
    ort = require("onnxruntime", "running exported ONNX files")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    target = resolve_device(device)
    if target.type == "cpu":
        return ["CPUExecutionProvider"]
    if target.type == "cuda" and has_cuda:
        return [("CUDAExecutionProvider", {"device_id": target.index or 0}), "CPUExecutionProvider"]
    raise SlimsegError(f"the onnx backend cannot run on {device}: this onnxruntime offers "
                       f"{', '.join(ort.get_available_providers())} (install onnxruntime-gpu for CUDA)")


def graph_signature(manifest: dict[str, Any], graph: str) -> tuple[Signature, Signature]:
    """The inputs and outputs that ``graph`` must have for the manifest's sizes (see
    slimseg.export.graphs for the contracts)."""
    channels, height, width = manifest["embedding_shape"]
    mask_h, mask_w = manifest["low_res_mask_size"]
    embedding = ("float", [None, channels, height, width])
    if graph == "image_encoder":
        size = manifest["input_size"]
        image = ("uint8", [None, 3, None, None]) if manifest["image_input"] == "uint8" else ("float", [None, 3, size, size])
        return {"image": image}, {"image_embeddings": embedding}
    if graph == "decoder":
        inputs = {"image_embeddings": embedding, "point_coords": ("float", [None, None, 2]),
                  "point_labels": ("float", [None, None]), "mask_input": ("float", [None, 1, mask_h, mask_w]),
                  "has_mask_input": ("float", [1]), "orig_im_size": ("float", [2])}
        return inputs, {"masks": ("float", [None, None, None, None]), "iou_predictions": ("float", [None, None]),
                        "low_res_masks": ("float", [None, None, mask_h, mask_w])}
    return {"image_embeddings": embedding}, {"heatmap_logits": ("float", [None, None, height, width])}


@dataclass(frozen=True)
class ProposalSettings:
    """An exported AutoPPN's peak-picking defaults, as ``AutoPPNConfig`` holds them."""

    top_k: int
    score_threshold: float


class OnnxAutoPPN:
    """The exported AutoPPN graph with the torch ``AutoPPN``'s interface: called on a
    (B, C, h, w) embedding it returns the heatmap logits; ``config`` holds the defaults."""

    def __init__(self, runner: GraphRunner, settings: dict[str, Any]) -> None:
        self.runner = runner
        self.config = ProposalSettings(int(settings["top_k"]), float(settings["score_threshold"]))

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner.run({"image_embeddings": embedding.detach().cpu().numpy()})[0])

    def propose(self, embedding: torch.Tensor, input_size: int | tuple[int, int],
                valid_size: tuple[int, int] | None = None) -> list[PointProposals]:
        """Point prompts with the exported defaults, picked by the torch model's ``propose_points``."""
        return propose_points(self(embedding), self.config.top_k, self.config.score_threshold, input_size, valid_size)


class OnnxSam:
    """An exported model folder, with the attributes the Predictor and MaskGenerator read
    from a torch model (``img_size``, ``mask_threshold``, ``image_format``, ``device``,
    ``preprocess``, ``autoppn``, ``propose_points``).

    ``variant`` picks float32, int8 or float16 files (default: the manifest's default_variant).
    """

    def __init__(self, folder: str | Path, variant: str | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",)) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest["default_variant"]
        if self.variant not in variants:
            raise SlimsegError(f"{folder}: no {self.variant} files here (exported: {', '.join(variants)})")
        files = variants[self.variant]
        self.img_size = int(self.manifest["input_size"])
        self.mask_threshold = float(self.manifest["mask_threshold"])
        self.image_format = self.manifest["image_format"]
        self.uint8_input = self.manifest["image_input"] == "uint8"
        self.pixel_mean = torch.tensor(self.manifest["pixel_mean"]).view(-1, 1, 1)
        self.pixel_std = torch.tensor(self.manifest["pixel_std"]).view(-1, 1, 1)
        self.low_res_size = tuple(self.manifest["low_res_mask_size"])
        runners = {}
        for graph, name in files.items():
            runners[graph] = GraphRunner(self.folder / name, providers)
            runners[graph].check(*graph_signature(self.manifest, graph), f"{graph} graph")
        self.encoder, self.decoder = runners["image_encoder"], runners["decoder"]
        self.autoppn = OnnxAutoPPN(runners["autoppn"], self.manifest["autoppn"]) if "autoppn" in runners else None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the returned tensors live

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's normalise-and-pad, the same function as the torch model's."""
        return normalize_and_pad(x, self.pixel_mean, self.pixel_std, self.img_size)

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, ...],
                          original_size: tuple[int, ...]) -> torch.Tensor:
        """SAM's mask upscaling, the same function as the torch model's and the decoder graph's;
        used by ``Predictor.upscale_masks`` when only some low-res masks need upscaling."""
        return upscale_mask_logits(masks, self.img_size, input_size, original_size)

    def embed(self, image: torch.Tensor) -> np.ndarray:
        """(B, 3, h, w) resized 0-255 image, max(h, w) == img_size → (B, C, h', w') embedding."""
        shape = tuple(image.shape)
        if len(shape) != 4 or shape[1] != 3 or min(shape[2:]) < 1 or max(shape[2:]) != self.img_size:
            # the graphs would crop or pad a wrong-sized image silently
            raise SlimsegError(f"{self.folder}: the image encoder takes (B, 3, H, W) images resized so that "
                               f"max(H, W) == {self.img_size} (ResizeLongestSide), got {shape}")
        if self.uint8_input:
            pixels = image.round().clamp(0, 255).to(torch.uint8) if image.is_floating_point() else image
            return self.encoder.run({"image": pixels.cpu().numpy()})[0]
        return self.encoder.run({"image": self.preprocess(image.float().cpu()).numpy()})[0]

    def decode(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the decoder graph on its six inputs (see slimseg.export.graphs)."""
        return self.decoder.run(inputs)

    def propose_points(self, embedding: torch.Tensor, valid_size: tuple[int, int] | None = None) -> list[PointProposals]:
        """AutoPPN point prompts, as ``LiteSam.propose_points``: heatmaps from onnxruntime, peaks
        picked by the same ``propose_points`` as the torch model."""
        if self.autoppn is None:
            raise SlimsegError(f"{self.folder}: this export has no AutoPPN graph")
        return self.autoppn.propose(embedding, self.img_size, valid_size)

    def make_predictor(self) -> "OnnxPredictor":
        return OnnxPredictor(self)


class OnnxPredictor(Predictor):
    """slimseg's ``Predictor`` (segment-anything's SamPredictor API) over exported files."""

    model: OnnxSam

    def __init__(self, model: OnnxSam | str | Path) -> None:
        super().__init__(model if isinstance(model, OnnxSam) else OnnxSam(model))

    def _embed(self, transformed_images: list[torch.Tensor]) -> torch.Tensor:
        # one image per call: the exported encoder pads raw pixels itself, so images of
        # different sizes cannot share a batch
        return torch.cat([torch.from_numpy(self.model.embed(image)) for image in transformed_images])

    def _decoder_inputs(self, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                        boxes: torch.Tensor | None, mask_input: torch.Tensor | None) -> dict[str, np.ndarray]:
        """The torch path's tokens as one padded point list: points, then one padding point
        when there is no box (as the prompt encoder adds), then the box corners (labels 2, 3)."""
        coords, labels = [], []
        if point_coords is not None:
            coords.append(point_coords.detach().cpu().float().numpy())
            labels.append(point_labels.detach().cpu().float().numpy())
            if boxes is None:
                batch = coords[0].shape[0]
                coords.append(np.zeros((batch, 1, 2), np.float32))
                labels.append(np.full((batch, 1), LABEL_PADDING, np.float32))
        if boxes is not None:
            corners = boxes.detach().cpu().float().numpy().reshape(-1, 2, 2)
            coords.append(corners)
            labels.append(np.tile(np.float32([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]), (len(corners), 1)))
        if not coords:
            # no point or box: an empty point axis gives the decoder no sparse token, exactly
            # as the torch prompt encoder does (a padding point would add one)
            batch = 1 if mask_input is None else mask_input.shape[0]
            coords.append(np.zeros((batch, 0, 2), np.float32))
            labels.append(np.zeros((batch, 0), np.float32))
        if mask_input is None:
            masks, has_mask = np.zeros((1, 1, *self.model.low_res_size), np.float32), np.zeros(1, np.float32)
        else:
            masks, has_mask = mask_input.detach().cpu().float().numpy(), np.ones(1, np.float32)
        return {
            "image_embeddings": self.features.numpy(),
            "point_coords": np.concatenate(coords, axis=1),
            "point_labels": np.concatenate(labels, axis=1),
            "mask_input": masks,
            "has_mask_input": has_mask,
            "orig_im_size": np.array(self.original_size, np.float32),
        }

    def predict_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``Predictor.predict_low_res``: (B, C, 4h, 4w) low-res logits and (B, C) IoU."""
        _, iou, low_res = self.predict_torch(point_coords, point_labels, boxes, mask_input, multimask_output, True)
        return low_res, iou

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``Predictor.predict_torch``: (B, C, H, W) masks, (B, C) IoU, (B, C, 4h, 4w) logits."""
        self._require_image()
        if point_coords is not None and point_labels is None:
            raise SlimsegError("point_labels must be given with point_coords")
        prompts = next((t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None), 1)
        if prompts == 0:  # onnxruntime fails on an empty prompt axis; torch returns empty outputs
            tokens = 3 if multimask_output else 1
            masks = torch.zeros(0, tokens, *self.original_size, dtype=torch.float32 if return_logits else torch.bool)
            return masks, torch.zeros(0, tokens), torch.zeros(0, tokens, *self.model.low_res_size)
        masks, iou, low_res = self.model.decode(self._decoder_inputs(point_coords, point_labels, boxes, mask_input))
        # output 0 is the single-mask answer, 1..3 the multimask candidates (as MaskDecoder.forward)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou, low_res = (torch.from_numpy(np.ascontiguousarray(a[:, selected])) for a in (masks, iou, low_res))
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res
