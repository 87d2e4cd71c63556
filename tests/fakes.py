"""A tiny deterministic encoder for fast engine tests: colour statistics for
images, a hashed bag of words for texts. It counts its forward passes."""

import hashlib

import numpy as np
from PIL import Image

from retrieval.encoders.base import DualEncoder

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (240, 240, 240)}


def fake_prepare(image: Image.Image):
    return np.asarray(image.convert("RGB").resize((16, 16)), np.float32) / 255.0


class FakeEncoder(DualEncoder):
    name = "fake"
    version = "1"
    dim = 16
    input_size = 16

    def __init__(self):
        self.images_embedded = 0

    def prepare(self, image: Image.Image):
        return fake_prepare(image)

    @property
    def portable_prepare(self):
        return fake_prepare

    @property
    def portable_factory(self):
        return type(self)

    def _color_vec(self, rgb) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        v[:3] = rgb
        v[3] = 0.05
        return v

    def _embed_images(self, prepared):
        self.images_embedded += len(prepared)
        return np.stack([self._color_vec(p.reshape(-1, 3).mean(0)) for p in prepared])

    def _embed_texts(self, texts):
        out = []
        for t in texts:
            v = np.zeros(self.dim, np.float32)
            for word in t.lower().split():
                if word in COLORS:
                    v += self._color_vec(np.array(COLORS[word]) / 255.0)
                else:
                    h = int(hashlib.md5(word.encode()).hexdigest(), 16)
                    v[4 + h % 12] += 0.1
            v[3] += 0.01
            out.append(v)
        return np.stack(out)


class TokenEncoder(FakeEncoder):
    """FakeEncoder with region tokens: each image's tokens are its vector's first 8 values."""

    token_shape = (2, 4)

    def encode_images_with_tokens(self, prepared):
        vecs = self.encode_images(prepared)
        return vecs, vecs[:, :8].reshape(-1, 2, 4).astype(np.float16)


class TokenReranker:
    """A reranker that reads region tokens (as the real one does): a pair
    scores the dot product of the text's vector with the image's tokens, so
    damaged tokens change the order. Counts its calls."""

    name = "fake-tokens"
    fusion_weight = 0.0

    def __init__(self, default_k: int = 20):
        self.calls = 0
        self.default_k = default_k

    def score_text_images(self, text, text_emb, images):
        self.calls += 1
        if any(c.tokens is None for c in images):
            raise ValueError("no region tokens")
        return np.array([float(np.asarray(c.tokens, np.float32).reshape(-1) @ text_emb[:8]) for c in images])

    def score_image_texts(self, image, texts, text_embs):
        self.calls += 1
        t = np.asarray(image.tokens, np.float32).reshape(-1)
        return np.asarray(text_embs, np.float32)[:, :8] @ t
