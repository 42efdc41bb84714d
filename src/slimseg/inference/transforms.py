"""Resize-longest-side geometry, identical to segment-anything's ``ResizeLongestSide``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slimseg.errors import SlimsegError


class ResizeLongestSide:
    """Resize images so that their longest side is ``target_length`` and map prompts along.

    numpy methods take HxWxC uint8 images and pixel coordinates; ``*_torch`` methods take
    batched tensors. Sizes are (H, W).
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side_length: int) -> tuple[int, int]:
        scale = long_side_length * 1.0 / max(old_h, old_w)
        return int(old_h * scale + 0.5), int(old_w * scale + 0.5)

    def check_resizable(self, shape: tuple[int, ...]) -> None:
        """Refuse an image of ``shape`` (H, W, ...) so elongated that its shorter side would
        round to 0 px: PIL and torch cannot resize to an empty image."""
        if min(self.get_preprocess_shape(shape[0], shape[1], self.target_length)) < 1:
            raise SlimsegError(
                f"image shape {tuple(shape)} is too elongated for the model's {self.target_length}-px input: "
                f"its shorter side would resize to 0 px (the longer side may be at most "
                f"{2 * self.target_length} times the shorter)"
            )

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 → resized HxWxC uint8, with PIL's bilinear filter as SAM uses."""
        self.check_resizable(image.shape)
        new_h, new_w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))

    def _scale(self, original_size: tuple[int, ...]) -> tuple[float, float]:
        old_h, old_w = original_size[:2]
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) XY pixel coordinates in the original image → the resized frame (float64)."""
        scale_x, scale_y = self._scale(original_size)
        coords = np.array(coords, dtype=float)
        coords[..., 0] *= scale_x
        coords[..., 1] *= scale_y
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(B, 4) XYXY boxes → the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float → resized, antialiased bilinear (close to, not equal to, PIL)."""
        self.check_resizable(tuple(image.shape[-2:]))
        new_h, new_w = self.get_preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        scale_x, scale_y = self._scale(original_size)
        return coords.to(torch.float) * coords.new_tensor([scale_x, scale_y], dtype=torch.float)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
