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
test data is never looked at. Where the model has a text memory
(``memory.py``), captions are expanded before they are scored, and so are
the bank's captions (each without its own image's vote), so a query and the
bank it is normalised against are made the same way. The bias depends on the item alone: it is
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

from .memory import MemorySettings, expand_texts

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
    text_owner: np.ndarray | None = None  # [Bt] row of ``images`` each bank caption belongs to
    memory: MemorySettings | None = None

    def __post_init__(self):
        if self.memory is not None and self.text_owner is None:
            raise ValueError("a text memory needs the bank's caption owners (text_owner); add them with "
                             "python benchmarks/select_inference.py --dataset DATA --write-owners, or rebuild "
                             "the bank with --write-bank")

    def expand(self, text_vectors: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Text embeddings as the model scores them: moved by the text memory
        where the model has one, else unchanged."""
        if self.memory is None:
            return np.asarray(text_vectors, np.float32)
        return expand_texts(text_vectors, self.texts, self.images, self.text_owner, self.memory, exclude)

    # The bank's captions as queries: expanded like any text, each without its
    # own image (0.8 s for 12,000 on two cores; only biases need it,
    # so a search that only ranks stored items never computes it).
    @cached_property
    def _queries(self) -> np.ndarray:
        return self.expand(self.texts, exclude=self.text_owner)

    # Typical raw bias of a training image / caption (a fixed sample of the
    # bank), computed on first use: opening a model to search costs nothing.
    @cached_property
    def _image_center(self) -> float:
        return float(log_sum_exp_bias(self.images[:1000], self._queries, self.beta).mean())

    @cached_property
    def _text_center(self) -> float:
        return float(log_sum_exp_bias(self._queries[:2000], self.images, self.beta).mean())

    def image_bias(self, image_vectors: np.ndarray) -> np.ndarray:
        """Bias of images as gallery items of text queries."""
        return self.alpha * (log_sum_exp_bias(image_vectors, self._queries, self.beta) - self._image_center)

    def text_bias(self, text_vectors: np.ndarray) -> np.ndarray:
        """Bias of captions as gallery items of image queries."""
        return self.alpha * (log_sum_exp_bias(text_vectors, self.images, self.beta) - self._text_center)

    def with_settings(self, beta: float | None = None, alpha: float | None = None) -> "QueryBank":
        out = QueryBank(self.texts, self.images, self.beta if beta is None else beta,
                        self.alpha if alpha is None else alpha, self.text_owner, self.memory)
        # beta and alpha leave the expanded bank captions as they are: every
        # copy shares this bank's one expansion instead of computing its own
        out.__dict__["_queries"] = self._queries
        return out

    def with_memory(self, memory: MemorySettings | None) -> "QueryBank":
        return QueryBank(self.texts, self.images, self.beta, self.alpha, self.text_owner, memory)

    # -- files ---------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        import torch
        from safetensors.torch import save_file

        path = Path(folder) / FILENAME
        tensors = {"texts": torch.from_numpy(np.ascontiguousarray(self.texts, np.float16)),
                   "images": torch.from_numpy(np.ascontiguousarray(self.images, np.float16))}
        if self.text_owner is not None:
            tensors["text_owner"] = torch.from_numpy(np.ascontiguousarray(self.text_owner, np.int32))
        save_file(tensors, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path, beta: float, alpha: float,
             memory: MemorySettings | None = None) -> "QueryBank | None":
        """The bank saved in a checkpoint folder, or None where it has none."""
        path = Path(folder) / FILENAME
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        t = load_file(str(path))
        owner = t["text_owner"].astype(np.int64) if "text_owner" in t else None
        return cls(t["texts"].astype(np.float32), t["images"].astype(np.float32), float(beta), float(alpha),
                   owner, memory)


def bank_rows(text_image: np.ndarray, captions_per_image: int | None = 2) -> np.ndarray:
    """Indices of the captions a bank keeps: the first ``captions_per_image``
    of each image, in order (None keeps them all)."""
    text_image = np.asarray(text_image)
    if captions_per_image is None:
        return np.arange(len(text_image))
    seen: dict[int, int] = {}
    keep = []
    for t, img in enumerate(text_image.tolist()):
        if seen.get(img, 0) < captions_per_image:
            keep.append(t)
            seen[img] = seen.get(img, 0) + 1
    return np.array(keep, dtype=np.int64)


def bank_from_split(text_vectors: np.ndarray, image_vectors: np.ndarray, text_image: np.ndarray,
                    captions_per_image: int | None = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bank of a training split: every image, and the captions
    :func:`bank_rows` keeps, with the image row of each."""
    keep = bank_rows(text_image, captions_per_image)
    return (np.asarray(text_vectors, np.float32)[keep], np.asarray(image_vectors, np.float32),
            np.asarray(text_image)[keep].astype(np.int64))


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
