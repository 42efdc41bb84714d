"""``Predictor``: segment-anything's ``SamPredictor`` interface over any slimseg SAM model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slimseg.devices import synchronize
from slimseg.errors import SlimsegError
from slimseg.inference.precision import autocast, parse_dtype
from slimseg.inference.transforms import ResizeLongestSide
from slimseg.modeling.sam import Sam

# See Predictor._decoder_chunk (measured on a 2-core x86 CPU with glibc's allocator).
DECODER_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's embedding and the sizes that map prompts and masks to its pixels.

    Attributes:
        features: (1, C, h, w) float32 image embedding, on the predictor's device.
        original_size: (H, W) of the image as given.
        input_size: (h, w) of the image resized so that its longest side is ``img_size``.
        seconds: this image's share of the encoder pass that embedded it.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    seconds: float = 0.0


def checked_image(image: np.ndarray) -> np.ndarray:
    """``image`` as an array, if it is a non-empty HxWx3 uint8 image; else a one-line error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SlimsegError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise SlimsegError(f"the image is empty: shape {image.shape}")
    return image


class Predictor:
    """Compute an image embedding once, then decode any number of prompts against it.

    Arguments, shapes and return values match segment-anything's ``SamPredictor``.
    ``dtype`` ("float32", "bfloat16" or "float16") runs the model under autocast at that
    precision; embeddings, logits and IoU predictions are always returned as float32.
    """

    def __init__(self, model: Sam, dtype: str | torch.dtype | None = None) -> None:
        self.model = model
        self.dtype = parse_dtype(dtype)
        self.transform = ResizeLongestSide(model.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 image given in ``image_format`` ("RGB" or "BGR")."""
        self.set_embedding(self.embed_images([image], image_format)[0])

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> list[ImageEmbedding]:
        """Embed HxWx3 uint8 images of any sizes in one encoder pass (batch len(images)).

        The current image is left as it is; :meth:`set_embedding` makes one of the results
        current. One pass fills a GPU better than one image at a time; on a CPU it gains
        nothing (see docs/benchmarks.md), so ``set_image`` is the way there.
        """
        if image_format not in ("RGB", "BGR"):
            raise SlimsegError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if len(images) == 0:
            return []
        resized, original_sizes = [], []
        for image in images:
            image = checked_image(image)
            if image_format != self.model.image_format:
                image = image[..., ::-1]
            pixels = self.transform.apply_image(np.ascontiguousarray(image))
            resized.append(torch.as_tensor(pixels, device=self.device).permute(2, 0, 1).contiguous()[None])
            original_sizes.append((int(image.shape[0]), int(image.shape[1])))
        synchronize(self.device)
        started = time.perf_counter()
        features = self._embed(resized)
        synchronize(self.device)
        share = (time.perf_counter() - started) / len(images)
        return [
            ImageEmbedding(features[i : i + 1], size, (tensor.shape[2], tensor.shape[3]), share)
            for i, (tensor, size) in enumerate(zip(resized, original_sizes))
        ]

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make an embedding from :meth:`embed_images` the current image, as ``set_image`` would."""
        if not isinstance(embedding, ImageEmbedding):
            raise SlimsegError(f"set_embedding expects an ImageEmbedding, got {type(embedding).__name__}")
        if embedding.features.ndim != 4 or embedding.features.shape[0] != 1:
            raise SlimsegError(f"an ImageEmbedding holds a (1, C, h, w) embedding, got {tuple(embedding.features.shape)}")
        self.reset_image()
        self.original_size = embedding.original_size
        self.input_size = embedding.input_size
        self.features = embedding.features.to(self.device)
        self.is_image_set = True

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed a (1, 3, H, W) image already resized so that max(H, W) == model.img_size."""
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or max(shape[2:]) != self.model.img_size:
            raise SlimsegError(
                f"set_torch_image expects a 1x3xHxW tensor with longest side {self.model.img_size}, got {shape}"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (shape[2], shape[3])
        self.features = self._embed([transformed_image])
        self.is_image_set = True

    def _embed(self, transformed_images: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w) embeddings of B resized (1, 3, H, W) images, each padded to the model's
        square input; other backends override it."""
        batch = torch.cat([self.model.preprocess(image.float()) for image in transformed_images])
        with autocast(self.device, self.dtype):
            features = self.model.image_encoder(batch)
        return features.float()

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise SlimsegError("no image is set: call set_image() before predicting")

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt, in original-image pixel coordinates.

        Arguments:
            point_coords: (N, 2) XY points; point_labels: (N,) 1 foreground, 0 background.
            box: (4,) XYXY box. mask_input: (1, 256, 256) low-res logits of an earlier call.
            multimask_output: three masks instead of one (best for a single ambiguous point).
            return_logits: return logits instead of thresholded masks.
        Returns:
            masks (C, H, W), iou predictions (C,), low-res logits (C, 256, 256); C is 3 or 1.
        """
        self._require_image()
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None:
            if point_labels is None:
                raise SlimsegError("point_labels must be given with point_coords")
            coords = self.transform.apply_coords(np.asarray(point_coords), self.original_size)
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=self.device)[None]
            if coords_torch.shape[:2] != labels_torch.shape or coords_torch.shape[-1] != 2:
                raise SlimsegError(
                    f"point_coords must be Nx2 and point_labels N, got {tuple(coords.shape)} and "
                    f"{tuple(np.asarray(point_labels).shape)}"
                )
        if box is not None:
            boxes = self.transform.apply_boxes(np.asarray(box), self.original_size)
            box_torch = torch.as_tensor(boxes, dtype=torch.float, device=self.device)[:1]
        if mask_input is not None:
            mask_torch = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompts at once; inputs already in the resized frame (``transform``).

        Arguments:
            point_coords: (B, N, 2); point_labels: (B, N); boxes: (B, 4); mask_input: (B, 1, 256, 256).
        Returns:
            masks (B, C, H, W), iou predictions (B, C), low-res logits (B, C, 256, 256).
        """
        low_res, iou = self.predict_low_res(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = self.upscale_masks(low_res)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    @torch.no_grad()
    def predict_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's outputs before upscaling: low-res logits (B, C, 4h, 4w) and IoU
        predictions (B, C), for inputs as in :meth:`predict_torch`. Code that filters
        candidates (``MaskGenerator``) upscales only the survivors with :meth:`upscale_masks`."""
        self._require_image()
        given = [t for t in (point_coords, boxes, mask_input) if t is not None]
        prompts = given[0].shape[0] if given else 1
        step = self._decoder_chunk()
        if prompts <= step:
            return self._decode(point_coords, point_labels, boxes, mask_input, multimask_output)

        def chunk(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
            # a tensor of batch 1 (one mask for every prompt) is shared, not sliced
            return t if t is None or t.shape[0] != prompts else t[start : start + step]

        inputs = (point_coords, point_labels, boxes, mask_input)
        parts = [self._decode(*(chunk(t, start) for t in inputs), multimask_output) for start in range(0, prompts, step)]
        return torch.cat([low_res for low_res, _ in parts]), torch.cat([iou for _, iou in parts])

    def _decoder_chunk(self) -> int:
        """Prompts decoded together. On the CPU, as many as keep the decoder's largest
        intermediate (the upscaled features, 8·h·w·C bytes a prompt) near DECODER_CHUNK_BYTES:
        larger batches spend more time faulting in fresh memory than they save."""
        if self.device.type != "cpu":
            return 2**31
        _, channels, height, width = self.features.shape
        return max(1, DECODER_CHUNK_BYTES // (8 * height * width * channels))

    def _decode(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        points = (point_coords, point_labels) if point_coords is not None else None
        with autocast(self.device, self.dtype):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        return low_res.float(), iou.float()

    def upscale_masks(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, 4h, 4w) low-res logits → (B, C, H, W) logits at the current image's size."""
        self._require_image()
        return self.model.postprocess_masks(low_res, self.input_size, self.original_size)

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, C, h, w) embedding of the current image."""
        self._require_image()
        return self.features
