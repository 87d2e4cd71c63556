"""Adapter of :class:`CrossModalReranker` to the :class:`Reranker` interface.

It is handed the text tower as a callable (``text_states``); images come with
their region tokens (stored ones, or made by the encoder for a query image).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import ImageCandidate, Reranker


class XmrReranker(Reranker):
    def __init__(self, model, text_states: Callable, fusion_weight: float, device=None, batch_size: int = 64,
                 default_k: int = 20):
        import torch

        self.model = model.eval()
        self.text_states = text_states
        self.fusion_weight = fusion_weight
        self.default_k = default_k
        self.device = device or next(model.parameters()).device
        self.batch_size = batch_size
        self.name = "xmr-cross-attention"
        self._torch = torch

    def _score(self, tokens: np.ndarray, img_emb: np.ndarray, words, mask, txt_emb) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for s in range(0, len(tokens), self.batch_size):
                r = torch.from_numpy(np.ascontiguousarray(tokens[s : s + self.batch_size])).to(self.device).float()
                e = torch.from_numpy(np.ascontiguousarray(img_emb[s : s + self.batch_size])).to(self.device).float()
                n = len(r)
                w, m, t = (x[s : s + n] if x.shape[0] > 1 else x.expand(n, *x.shape[1:]) for x in (words, mask, txt_emb))
                out.append(self.model(r, w, m, e, t).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score_text_images(self, text, text_emb, images: list[ImageCandidate]) -> np.ndarray:
        if any(c.tokens is None for c in images):
            raise ValueError("this index stores no region tokens; re-index with the model's reranker or use --no-rerank")
        t_emb, words, mask = self.text_states([text])
        tokens = np.stack([c.tokens for c in images])
        embs = np.stack([c.embedding for c in images]).astype(np.float32)
        return self._score(tokens, embs, words, mask, t_emb)

    def score_image_texts(self, image: ImageCandidate, texts, text_embs) -> np.ndarray:
        if image.tokens is None:
            raise ValueError("no region tokens for the query image")
        t_emb, words, mask = self.text_states(list(texts))
        n = len(texts)
        tokens = np.broadcast_to(image.tokens, (n,) + image.tokens.shape)
        embs = np.broadcast_to(image.embedding.astype(np.float32), (n, image.embedding.shape[0]))
        return self._score(tokens, embs, words, mask, t_emb)
