"""``resize`` and ``to_pil_image`` as torchvision applies them to PIL images."""

import numpy as np
from PIL import Image


def to_pil_image(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # torchvision resizes PIL images with PIL's own bilinear filter; size is (h, w).
    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
