"""Image preprocessing shared by indexing, training and evaluation.

Photos are resized to a square, ignoring aspect ratio: the Flickr8k copies the
default model was trained on were squashed the same way, so a full-size photo
reaches the model looking like the training images.

Test-time views (:data:`VIEWS`) work on whole batches of prepared squares,
as numpy arrays on the CPU or as torch tensors on the model's device, so a
GPU never waits for per-image work on the host. The 85% centre crop is
resized by Pillow itself for numpy batches and, for tensors, by Pillow's
bicubic filter reimplemented in integer arithmetic, bit-identical to
``PIL.Image.resize(..., BICUBIC)`` (tested), so an index does not depend on
where it was built.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

VIEWS = ("full", "flip", "crop85", "crop85flip")
_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (32 - 8 - 2)


def squash_resize(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``uint8[size, size, 3]``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=16)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights ``[out_size, taps]`` of Pillow's
    bicubic resampling along one axis (unused taps have weight 0)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, ksize), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        ks = [_bicubic((x + lo - center + 0.5) / filterscale) for x in range(hi - lo)]
        total = sum(ks)
        for j, k in enumerate(ks):
            k = k / total if total != 0.0 else k
            idx[o, j] = lo + j
            weights[o, j] = int(k * (1 << _PRECISION_BITS) + (0.5 if k >= 0 else -0.5))
    return idx, weights


def _resample_axis(x, axis: int, out_size: int):
    """Pillow-exact bicubic resize of a torch int32 batch ``[B, H, W, C]`` along axis 1 or 2."""
    import torch

    idx, w = bicubic_taps(x.shape[axis], out_size)
    idx_t = torch.from_numpy(idx).to(x.device)
    w_t = torch.from_numpy(w).to(x.device)
    if axis == 1:
        s = (x[:, idx_t] * w_t[None, :, :, None, None]).sum(2)
    else:
        s = (x[:, :, idx_t] * w_t[None, None, :, :, None]).sum(3)
    return ((s + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS).clamp(0, 255).to(torch.int32)


def _center_crop(batch, fraction: float, chunk: int = 8):
    """Centre square of ``fraction`` of the side, resized back to the full side.

    numpy batches go through Pillow image by image (fastest on a CPU); torch
    batches through the integer reimplementation on their own device.
    """
    size = batch.shape[1]
    side = int(round(size * fraction))
    off = (size - side) // 2
    crop = batch[:, off : off + side, off : off + side]
    if isinstance(batch, np.ndarray):
        out = np.empty_like(batch)
        for n, a in enumerate(crop):
            out[n] = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.BICUBIC))
        return out
    import torch

    parts = []
    for s in range(0, batch.shape[0], chunk):  # bounds the [B, H, W, taps, C] temporaries
        x = crop[s : s + chunk].to(torch.int32)
        x = _resample_axis(_resample_axis(x, 2, size), 1, size)  # horizontal pass first, as Pillow
        parts.append(x.to(torch.uint8))
    return torch.cat(parts) if parts else batch.clone()


def _flip(batch):
    if isinstance(batch, np.ndarray):
        return np.ascontiguousarray(batch[:, :, ::-1])
    return batch.flip(2)


def view_batch(batch, view: str):
    """One test-time view of a batch of prepared squares (``uint8 [B, S, S, 3]``,
    a numpy array or a torch tensor on any device)."""
    if view == "full":
        return batch
    if view == "flip":
        return _flip(batch)
    if view == "crop85":
        return _center_crop(batch, 0.85)
    if view == "crop85flip":
        return _flip(_center_crop(batch, 0.85))
    raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")


def view_batches(batch, views):
    """``(view, pixels)`` for each of ``views`` in order; the mirrored centre
    crop reuses the centre crop when both are asked for (the crop's resize is
    most of a view's cost)."""
    crop = None
    for view in views:
        if view in ("crop85", "crop85flip"):
            if crop is None:
                crop = _center_crop(batch, 0.85)
            yield view, (_flip(crop) if view == "crop85flip" else crop)
        else:
            yield view, view_batch(batch, view)
