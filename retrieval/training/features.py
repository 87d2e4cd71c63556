"""Features of towers that stay as pretrained, computed once and cached.

A locked image tower gives the same pooled features for an image every
epoch, so training heads on top of it needs each training image's views
only once: the test-time views plus a few random crops. A frozen text tower
gives each caption's mean-pooled word states once. Both are kept in ``.npz``
files named by what they hold (tower, size, views, the image list), so a
second run, or another experiment, reads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.decode import BadImage, decode_image

from ..encoders.base import embed_by_length
from ..encoders.preprocess import squash_resize, view_batch
from ..encoders.xmr_model import XmrDualModel, mean_pool

log = logging.getLogger(__name__)

def _key_file(folder: Path, kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{kind}-{digest}.npz"


def random_crop(image: Image.Image, size: int, rng: random.Random) -> np.ndarray:
    """One random-crop view of a decoded image, squashed to ``size``."""
    w, h = image.size
    area, aspect = rng.uniform(0.35, 1.0), rng.uniform(3 / 4, 4 / 3)
    cw = min(w, max(1, round(w * (area * aspect) ** 0.5)))
    ch = min(h, max(1, round(h * (area / aspect) ** 0.5)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = squash_resize(image.crop((x0, y0, x0 + cw, y0 + ch)), size)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


@torch.inference_mode()
def pooled_features(model: XmrDualModel, paths: list[str], views: tuple[str, ...], n_random: int = 0,
                    seed: int = 0, batch: int = 2, progress=None) -> np.ndarray:
    """``float16 [N, V, C]``: the tower's pooled features of every image in each
    of ``views`` and then ``n_random`` random crops. Small batches: on a
    CPU these depthwise-conv towers run fastest at two images."""
    tower, size = model.image_tower, model.config.image_size
    rng = random.Random(seed)
    out = None
    for s in range(0, len(paths), batch):
        images = []
        for p in paths[s : s + batch]:
            try:
                images.append(decode_image(p).image.convert("RGB"))
            except BadImage as exc:
                raise RuntimeError(f"{p}: {exc}") from None
        squares = np.stack([squash_resize(im, size) for im in images])
        batches = [view_batch(squares, v) for v in views]
        batches += [np.stack([random_crop(im, size, rng) for im in images]) for _ in range(n_random)]
        for v, pixels in enumerate(batches):
            x = model.normalize_pixels(torch.from_numpy(pixels))
            pooled = tower.extract_features(x).mean(dim=(2, 3)).numpy()
            if out is None:
                out = np.zeros((len(paths), len(batches), pooled.shape[1]), np.float16)
            out[s : s + len(images), v] = pooled
        if progress:
            progress(len(images))
    return out if out is not None else np.zeros((0, len(views) + n_random, 0), np.float16)


@torch.inference_mode()
def text_features(model: XmrDualModel, texts: list[str], batch: int = 64, progress=None) -> np.ndarray:
    """``float32 [N, H]``: the frozen text tower's mean-pooled word states."""
    from ..encoders.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer()

    def embed(part: list[str]) -> np.ndarray:
        ids, mask = tok(part, model.config.text_max_len)
        if progress:
            progress(len(part))
        return mean_pool(model.text_tower(ids, mask), mask).numpy()

    return embed_by_length(texts, batch, embed) if texts else np.zeros((0, model.word_dim), np.float32)


def cached_images(folder: Path, model: XmrDualModel, paths: list[str], views: tuple[str, ...], n_random: int = 0,
                  seed: int = 0, progress=None, weights: str = "pretrained") -> np.ndarray:
    """:func:`pooled_features`, read from ``folder`` where an earlier run left
    them; ``weights`` names the tower's weights (part of the file's key)."""
    key = {"tower": model.config.image_tower, "size": model.config.image_size, "views": list(views),
           "random": n_random, "seed": seed, "images": [Path(p).name for p in paths], "weights": weights}
    path = _key_file(folder, "images", key)
    if path.is_file():
        log.info("image features from %s", path)
        return np.load(path)["pooled"]
    feats = pooled_features(model, paths, views, n_random, seed, progress=progress)
    _save(path, pooled=feats)
    return feats


def cached_texts(folder: Path, model: XmrDualModel, texts: list[str], progress=None) -> np.ndarray:
    """:func:`text_features`, read from ``folder`` where an earlier run left them."""
    path = _key_file(folder, "texts", {"tower": "all-MiniLM-L6-v2", "max_len": model.config.text_max_len,
                                       "texts": texts})
    if path.is_file():
        return np.load(path)["emb"]
    feats = text_features(model, texts, progress=progress)
    _save(path, emb=feats)
    return feats


def _save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
