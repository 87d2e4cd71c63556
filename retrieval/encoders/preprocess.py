"""Image preprocessing shared by indexing, training and evaluation.

Photos are resized to a square, ignoring aspect ratio: the Flickr8k copies the
default model was trained on were squashed the same way, so a full-size photo
reaches the model looking like the training images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def squash_resize(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``uint8[size, size, 3]``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def _center_crop(arr: np.ndarray, fraction: float) -> np.ndarray:
    size = arr.shape[0]
    side = int(round(size * fraction))
    off = (size - side) // 2
    patch = Image.fromarray(arr[off : off + side, off : off + side])
    return np.asarray(patch.resize((size, size), Image.BICUBIC), dtype=np.uint8)


# Test-time views of a prepared square image. A model's embedding is the mean
# of its views' normalised embeddings; region tokens come from the first view.
VIEWS = {
    "full": lambda a: a,
    "flip": lambda a: np.ascontiguousarray(a[:, ::-1]),
    "crop85": lambda a: _center_crop(a, 0.85),
    "crop85flip": lambda a: np.ascontiguousarray(_center_crop(a, 0.85)[:, ::-1]),
}


def apply_view(arr: np.ndarray, view: str) -> np.ndarray:
    try:
        return VIEWS[view](arr)
    except KeyError:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}") from None
