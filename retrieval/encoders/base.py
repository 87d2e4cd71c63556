"""The dual-encoder interface every model in the registry implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """The one place where embeddings are normalised."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def text_batch_size(device) -> int:
    """Texts per forward pass: small on a CPU (the batch stays in cache), large on a GPU."""
    return 64 if device.type == "cpu" else 512


def embed_by_length(texts: list[str], batch: int, embed) -> np.ndarray:
    """``embed(list of texts) -> [n, D] array`` applied to batches of texts of
    similar length (less padding; small batches stay in a CPU's cache), rows
    returned in input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    for s in range(0, len(texts), batch):
        idx = order[s : s + batch]
        part = np.asarray(embed([texts[i] for i in idx]), dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), part.shape[1]), np.float32)
        out[idx] = part
    return out if out is not None else np.zeros((0, 0), np.float32)


class DualEncoder(ABC):
    """Maps images and texts into one space; owns its preprocessing.

    ``prepare`` runs on decoding worker threads and turns a decoded RGB image
    into whatever the model's batch forward pass takes; ``encode_images`` and
    ``encode_texts`` return L2-normalised float32 arrays.
    """

    name: str
    version: str
    dim: int
    #: pixels on the short side the model needs (lets JPEG decoding use draft mode)
    input_size: int = 224
    #: query-bank normalisation of recall scores (querybank.py), when the model ships one
    querybank = None
    #: full versions of earlier releases of this model whose image side equals
    #: this one's (indexes built with them lack an image-side record)
    earlier_versions: tuple[str, ...] = ()

    def image_side(self) -> str:
        """Names what an index's stored image vectors (and region tokens)
        depend on. Where an index's matches, a new version of the model that
        changed only its text side can bring the index up to date in place
        (``Engine.upgrade``) instead of decoding every image again. By
        default the whole version: no in-place upgrade."""
        return self.version

    @abstractmethod
    def prepare(self, image: Image.Image):
        ...

    @property
    def portable_prepare(self):
        """``prepare`` as a picklable callable, so decoding can run in worker
        processes; None where it needs the live encoder (threads then)."""
        return None

    @property
    def portable_factory(self):
        """A picklable callable that builds this same model in another process
        or on another machine (Ray encoder actors; the model's files must be
        there too); None where it cannot be rebuilt from its name."""
        return None

    @abstractmethod
    def _embed_images(self, prepared: list) -> np.ndarray:
        ...

    @abstractmethod
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        ...

    def encode_images(self, prepared: list) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._embed_images(prepared))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._embed_texts(texts))

    def encode_images_with_tokens(self, prepared: list) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings plus region tokens for the reranker (None when the model has none)."""
        return self.encode_images(prepared), None
