"""``Predictor``: segment-anything's ``SamPredictor`` interface over any slimseg SAM model."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

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


def checked_image(image: np.ndarray, transform: ResizeLongestSide | None = None) -> np.ndarray:
    """``image`` as an array, if it is a non-empty HxWx3 uint8 image (that ``transform``, if
    given, can resize); else a one-line error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SlimsegError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise SlimsegError(f"the image is empty: shape {image.shape}")
    if transform is not None:
        transform.check_resizable(image.shape)
    return image


def checked_image_list(images: Sequence[np.ndarray], name: str) -> Sequence[np.ndarray]:
    """``images`` if it is a list of images; one HxWx3 array would otherwise be taken for a
    list of its rows."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        raise SlimsegError(f"{name} takes a list of images, got one image of shape {tuple(images.shape)}: "
                           f"pass [image]")
    return images


def _float_array(value: object, name: str, expected: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SlimsegError(f"{name} must be {expected}, got {type(value).__name__}") from None


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise SlimsegError(f"{name} must be finite numbers, got {np.count_nonzero(~np.isfinite(array))} NaN or "
                           f"infinite value(s)")
    return array


def checked_points(
    coords: object, labels: object, names: tuple[str, str] = ("point_coords", "point_labels")
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float64 XY points and (N,) int64 labels, each 1 (foreground) or 0 (background).

    Labels -1 (padding) and 2, 3 (box corners) are SAM's internal tokens: a point given them
    silently becomes something else, so only ``predict_torch`` takes them, as SAM does."""
    coords_name, labels_name = names
    points = _float_array(coords, coords_name, "(N, 2) XY points")
    if points.size == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise SlimsegError(f"{coords_name} must have shape (N, 2), got {points.shape}")
    _finite(points, coords_name)
    values = _float_array(labels, labels_name, "(N,) labels")
    if values.shape != (len(points),):
        raise SlimsegError(f"{labels_name} must have shape ({len(points)},), one label per point, got {values.shape}")
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        shown = ", ".join(f"{value:g}" for value in np.unique(bad))
        raise SlimsegError(f"{labels_name} must be 1 (foreground) or 0 (background), got {shown} "
                           f"(predict_torch takes SAM's other labels)")
    return points, values.astype(np.int64)


def checked_box(box: object, name: str = "box", several: str = "use predict_torch") -> np.ndarray:
    """(4,) float64 XYXY box from 4 finite numbers, shape (4,) or (1, 4); ``several`` says
    what to do with more than one box."""
    array = _float_array(box, name, "4 numbers x0, y0, x1, y1")
    if array.shape not in ((4,), (1, 4)):
        hint = f"; for several boxes, {several}" if array.size > 4 and array.size % 4 == 0 else ""
        raise SlimsegError(f"{name} must be 4 numbers x0, y0, x1, y1 (shape (4,) or (1, 4)), got shape {array.shape}{hint}")
    return _finite(array.reshape(4), name)


# what the predictor reads of a model, slimseg's or an exported one (OnnxSam)
_MODEL_ATTRIBUTES = ("img_size", "image_format", "mask_threshold", "preprocess", "postprocess_masks")


def _check_predictable(model: object) -> None:
    """A one-line error for a model the predictor cannot drive, such as segment-anything's
    own Sam (which lacks img_size), instead of an AttributeError at the first image."""
    missing = [name for name in _MODEL_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise SlimsegError(f"Predictor takes a slimseg model, got {kind} (no {', '.join(missing)}): load the "
                           "checkpoint with slimseg.load_model(path), which reads segment-anything and "
                           "transformers weights as they are")


class Predictor:
    """Compute an image embedding once, then decode any number of prompts against it.

    Arguments, shapes and return values match segment-anything's ``SamPredictor``.
    ``dtype`` ("float32", "bfloat16" or "float16") runs the model under autocast at that
    precision; embeddings, logits and IoU predictions are always returned as float32.
    """

    def __init__(self, model: Sam, dtype: str | torch.dtype | None = None) -> None:
        _check_predictable(model)
        self.model = model
        self.dtype = parse_dtype(dtype)
        self.transform = ResizeLongestSide(model.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def fresh_copy(self) -> Predictor:
        """A predictor over the same model, precision and transform, with no image set: its
        own current image, for a caller that must not share one (e.g. another thread)."""
        copied = copy.copy(self)
        copied.reset_image()
        return copied

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 image given in ``image_format`` ("RGB" or "BGR")."""
        # a failed call must not leave the previous image to answer later predictions
        self.reset_image()
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
        images = checked_image_list(images, "embed_images")
        if len(images) == 0:
            return []
        resized, original_sizes = [], []
        for image in images:
            image = checked_image(image, self.transform)
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
        self.reset_image()
        if not isinstance(transformed_image, torch.Tensor):
            raise SlimsegError(f"set_torch_image expects a torch.Tensor, got {type(transformed_image).__name__}")
        try:
            size = tuple(original_image_size)
        except TypeError:
            size = ()
        if len(size) != 2 or not all(isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in size):
            raise SlimsegError(f"original_image_size must be two positive integers (H, W), got {original_image_size!r}")
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or max(shape[2:]) != self.model.img_size:
            raise SlimsegError(
                f"set_torch_image expects a 1x3xHxW tensor with longest side {self.model.img_size}, got {shape}"
            )
        self.original_size = (int(size[0]), int(size[1]))
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
            box: (4,) or (1, 4) XYXY box. mask_input: (1, 4h, 4w) low-res logits of an earlier
                call, (1, 256, 256) for 1024-px models.
            multimask_output: three masks instead of one (best for a single ambiguous point).
            return_logits: return logits instead of thresholded masks.
        Returns:
            masks (C, H, W), iou predictions (C,), low-res logits (C, 4h, 4w); C is 3 or 1.
        """
        self._require_image()
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None:
            if point_labels is None:
                raise SlimsegError("point_labels must be given with point_coords")
            points, labels = checked_points(point_coords, point_labels)
            coords = self.transform.apply_coords(points, self.original_size)
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            boxes = self.transform.apply_boxes(checked_box(box), self.original_size)
            box_torch = torch.as_tensor(boxes, dtype=torch.float, device=self.device)
        if mask_input is not None:
            mask_torch = torch.as_tensor(self._checked_mask_input(mask_input), device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    def _checked_mask_input(self, mask_input: object) -> np.ndarray:
        """(1, 4h, 4w) float32 logits: the decoder's low-res output size for this embedding."""
        expected = (1, 4 * self.features.shape[-2], 4 * self.features.shape[-1])
        mask = _float_array(mask_input, "mask_input", f"an array of shape {expected}").astype(np.float32)
        if mask.shape != expected:
            raise SlimsegError(f"mask_input must have shape {expected}, the low-res logits of an earlier predict() "
                               f"with this model, got {mask.shape}")
        return mask

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
            point_coords: (B, N, 2); point_labels: (B, N), unchecked as in segment-anything (1, 0,
                and its internal -1 padding, 2 and 3 box corners); boxes: (B, 4); mask_input: (B, 1, 4h, 4w).
        Returns:
            masks (B, C, H, W), iou predictions (B, C), low-res logits (B, C, 4h, 4w).
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
