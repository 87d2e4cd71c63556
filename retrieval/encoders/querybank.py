"""Query-bank normalisation of dual-encoder scores (hubness correction).

Some gallery items ("hubs") sit close to very many queries and crowd the top
of every ranking. Following Querybank Normalisation (Bogolin et al., CVPR
2022, inverted softmax), each gallery item gets a bias: how strongly a bank
of *training* queries already points at it,

    bias(g) = alpha / beta * log sum_b exp(beta * <g, q_b>)

and a query ranks items by ``cosine - bias``. Biases are centred on the
bias of a typical training item, so corrected scores stay on the scale of a
cosine (a constant per direction: no ranking changes). The bank holds caption
embeddings of the training split (the queries that search images) and image
embeddings of the training split (the queries that search captions), so the
test data is never looked at. The bias depends on the item alone: it is
computed once when an item is indexed, stored beside its vector, and the
FAISS index searches the exact corrected score by carrying it as one extra
dimension (:func:`augment_items`, :func:`augment_queries`).

Pure computation and (de)serialisation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FILENAME = "querybank.safetensors"


def log_sum_exp_bias(items: np.ndarray, bank: np.ndarray, beta: float, chunk: int = 4096) -> np.ndarray:
    """``1/beta * log sum_b exp(beta * items @ bank.T)`` per item, computed stably."""
    items = np.asarray(items, dtype=np.float32)
    out = np.empty(len(items), np.float32)
    bank_t = np.ascontiguousarray(bank.T, dtype=np.float32)
    for s in range(0, len(items), chunk):
        sims = items[s : s + chunk] @ bank_t
        top = sims.max(axis=1, keepdims=True)
        out[s : s + chunk] = (top + np.log(np.exp(beta * (sims - top)).sum(axis=1, keepdims=True)) / beta)[:, 0]
    return out


@dataclass
class QueryBank:
    """Bank embeddings of one model plus the two constants chosen on dev."""

    texts: np.ndarray  # [Bt, D] normalised caption embeddings (queries for images)
    images: np.ndarray  # [Bi, D] normalised image embeddings (queries for captions)
    beta: float = 15.0
    alpha: float = 1.0

    # Typical raw bias of a training image / caption (a fixed sample of the
    # bank), computed on first use: opening a model to search costs nothing.
    @cached_property
    def _image_center(self) -> float:
        return float(log_sum_exp_bias(self.images[:1000], self.texts, self.beta).mean())

    @cached_property
    def _text_center(self) -> float:
        return float(log_sum_exp_bias(self.texts[:2000], self.images, self.beta).mean())

    def image_bias(self, image_vectors: np.ndarray) -> np.ndarray:
        """Bias of images as gallery items of text queries."""
        return self.alpha * (log_sum_exp_bias(image_vectors, self.texts, self.beta) - self._image_center)

    def text_bias(self, text_vectors: np.ndarray) -> np.ndarray:
        """Bias of captions as gallery items of image queries."""
        return self.alpha * (log_sum_exp_bias(text_vectors, self.images, self.beta) - self._text_center)

    def with_settings(self, beta: float | None = None, alpha: float | None = None) -> "QueryBank":
        return QueryBank(self.texts, self.images, self.beta if beta is None else beta,
                         self.alpha if alpha is None else alpha)

    # -- files ---------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        import torch
        from safetensors.torch import save_file

        path = Path(folder) / FILENAME
        save_file({"texts": torch.from_numpy(np.ascontiguousarray(self.texts, np.float16)),
                   "images": torch.from_numpy(np.ascontiguousarray(self.images, np.float16))}, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path, beta: float, alpha: float) -> "QueryBank | None":
        """The bank saved in a checkpoint folder, or None where it has none."""
        path = Path(folder) / FILENAME
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        t = load_file(str(path))
        return cls(t["texts"].astype(np.float32), t["images"].astype(np.float32), float(beta), float(alpha))


def bank_from_split(text_vectors: np.ndarray, image_vectors: np.ndarray, text_image: np.ndarray,
                    captions_per_image: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """The bank of a training split: every image, and the first
    ``captions_per_image`` captions of each (None keeps them all)."""
    text_image = np.asarray(text_image)
    if captions_per_image is None:
        keep = np.arange(len(text_image))
    else:
        seen: dict[int, int] = {}
        keep = []
        for t, img in enumerate(text_image.tolist()):
            if seen.get(img, 0) < captions_per_image:
                keep.append(t)
                seen[img] = seen.get(img, 0) + 1
        keep = np.array(keep, dtype=np.int64)
    return np.asarray(text_vectors, np.float32)[keep], np.asarray(image_vectors, np.float32)


# -- the FAISS side: the corrected score as an inner product ----------------------
def augment_items(vectors: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Gallery vectors ``[v, bias]`` (bias 0 where None)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    col = np.zeros((len(vectors), 1), np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1, 1)
    return np.ascontiguousarray(np.hstack([vectors, col]))


def augment_queries(queries: np.ndarray, corrected: bool) -> np.ndarray:
    """Query vectors ``[q, -1]`` (scores ``cos - bias``) or ``[q, 0]`` (plain cosine)."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    col = np.full((len(queries), 1), -1.0 if corrected else 0.0, np.float32)
    return np.ascontiguousarray(np.hstack([queries, col]))
