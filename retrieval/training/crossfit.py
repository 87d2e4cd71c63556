"""Cross-fitted image embeddings of the train split.

A model ranks its own train images far better than photos it never saw (the
image side was fitted to them), so a reranker trained on the train split's
recall scores and hard negatives learns from a recall that is more reliable
than it will ever be at query time. Cross-fitting gives every train image the
embedding of a model that did not see it: the train images are split into
folds and, for each fold, the image head is trained from a fresh start on the
other folds' cached tower features against the model's fixed text side, then
embeds the fold. (The image tower itself is shared by every fold; only the
head is held out.)
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from ..encoders.xmr_model import XmrDualModel
from .locked import head_state, image_embeddings

log = logging.getLogger(__name__)


def fold_ids(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number in ``[0, folds)`` for each of ``n`` items, sizes within one."""
    if folds < 2 or folds > n:
        raise ValueError(f"cross-fitting needs 2 to {n} folds, not {folds}")
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)


def reset_image_head(model: XmrDualModel, seed: int) -> None:
    """The image head (and its MLP branch) drawn afresh, as an untrained model has it."""
    torch.manual_seed(seed)
    for module in [model.image_head] + ([model.image_mlp] if model.image_mlp is not None else []):
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def crossfit_embeddings(model: XmrDualModel, pooled: torch.Tensor, text: torch.Tensor, owner: np.ndarray,
                        folds: int, opts, progress=None) -> np.ndarray:
    """Normalised embeddings ``[N, D]`` of ``pooled`` (``[N, V, C]`` tower
    features of N images in V views), each from an image head that never saw
    its image. ``text``: fixed caption embeddings; ``owner[t]``: the image of
    caption ``t``; ``opts``: ``wise.WiseOptions`` (epochs, lr, ...) of each
    fold's fit. The model comes back with the heads it was given."""
    from .wise import fit_image_head

    source = head_state(model)
    fold = fold_ids(len(pooled), folds, opts.seed)
    out = np.zeros((len(pooled), model.config.embed_dim), np.float32)
    try:
        for k in range(folds):
            seen = fold != k
            rows = np.flatnonzero(seen)
            new_row = np.full(len(pooled), -1)
            new_row[rows] = np.arange(len(rows))
            keep = seen[owner]
            model.load_state_dict(source, strict=False)
            reset_image_head(model, opts.seed + k)
            history = fit_image_head(model, pooled[rows], text[keep], new_row[owner[keep]], replace(opts, seed=opts.seed + k))
            with torch.no_grad():
                out[~seen] = image_embeddings(model, pooled[~seen]).numpy()
            log.info("fold %d/%d: %d images held out, head loss %.4f", k + 1, folds, int((~seen).sum()),
                     history[-1]["loss"])
            if progress:
                progress(1)
    finally:
        model.load_state_dict(source, strict=False)
    return out
