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


def rsum_of_ranks(i2t: np.ndarray, t2i: np.ndarray, ks=KS) -> float:
    return sum(recalls(i2t, ks).values()) + sum(recalls(t2i, ks).values())


def bootstrap_rsum_delta(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                         text_image: np.ndarray, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict:
    """How sure is "B beats A"? Paired bootstrap over images of rsum(B) - rsum(A).

    ``a`` and ``b`` are ``(i2t ranks [n_img], t2i ranks [n_txt])`` of two
    systems on the same split. Each resample draws images with replacement and
    keeps every caption of a drawn image, so both directions move together.
    Returns the observed delta, the interval at ``level`` and the share of
    resamples where B is not better.
    """
    n_img = len(a[0])
    if len(b[0]) != n_img or len(a[1]) != len(text_image) or len(b[1]) != len(text_image):
        raise ValueError("both systems must be ranked on the same images and captions")
    ks = np.asarray(KS)
    # per-item hit counts summed over the three K: rsum = 100 * (mean over images + mean over captions)
    hi = (a[0][:, None] < ks).sum(1) - (b[0][:, None] < ks).sum(1)
    ht = (a[1][:, None] < ks).sum(1) - (b[1][:, None] < ks).sum(1)
    cap_sum = np.bincount(text_image, weights=ht, minlength=n_img)  # per image: its captions' deltas
    cap_n = np.bincount(text_image, minlength=n_img)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_img, size=(n_boot, n_img))
    counts = np.stack([np.bincount(d, minlength=n_img) for d in draws])  # [n_boot, n_img]
    deltas = -100.0 * (counts @ hi / n_img + (counts @ cap_sum) / np.maximum(counts @ cap_n, 1))
    observed = -100.0 * (hi.mean() + ht.mean())
    lo, up = np.quantile(deltas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(observed), "low": float(lo), "high": float(up),
            "p_not_better": float(np.mean(deltas <= 0))}


def top1_changes(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """How a second stage moved the first hit, from the ranks of the same
    queries before and after it (``i2t_ranks`` or ``t2i_ranks``): the percent
    of queries whose right answer it took off the top ("worse") and the
    percent it brought to the top ("better")."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} ranks before, {len(after)} after")
    worse = float(100.0 * np.mean((before == 0) & (after != 0))) if len(before) else 0.0
    better = float(100.0 * np.mean((before != 0) & (after == 0))) if len(before) else 0.0
    return {"worse": worse, "better": better}
