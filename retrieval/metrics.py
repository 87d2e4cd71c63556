"""Retrieval metrics of the standard image-caption protocol (pure numpy)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def i2t_ranks(sim: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """For each image (row of ``sim [n_img, n_txt]``), the best rank of any of its captions."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = text_image[order] == np.arange(sim.shape[0])[:, None]
    return hits.argmax(axis=1)


def t2i_ranks(sim: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """For each caption (column of ``sim``), the rank of its image."""
    order = np.argsort(-sim.T, axis=1, kind="stable")
    return (order == text_image[:, None]).argmax(axis=1)


def recalls(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_report(sim: np.ndarray, text_image: np.ndarray, sim_t2i: np.ndarray | None = None) -> dict:
    """``{"i2t": {...}, "t2i": {...}, "rsum": ..}`` with recalls in percent.

    ``sim_t2i``, when given, scores the text->image direction (its columns)
    while ``sim``'s rows score image->text: reranking changes each direction's
    scores differently.
    """
    i2t = recalls(i2t_ranks(sim, text_image))
    t2i = recalls(t2i_ranks(sim if sim_t2i is None else sim_t2i, text_image))
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t.values()) + sum(t2i.values())}


def apply_rerank(sim: np.ndarray, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Copy of ``sim`` where the reranked pairs ``(rows[i], cols[i])`` get
    ``scores[i]`` lifted above every pair that was not reranked."""
    out = sim.astype(np.float64, copy=True)
    lift = float(np.abs(sim).max()) + 1.0 + float(np.abs(scores).max()) * 2
    out[rows, cols] = lift + scores
    return out
