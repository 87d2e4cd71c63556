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
