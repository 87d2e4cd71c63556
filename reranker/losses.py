"""Training objectives for the reranker: matching (ITM) on hard negatives plus
a listwise ranking term, and the negative samplers they draw from."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mine_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, pool: int
) -> torch.Tensor:
    """Top-``pool`` most similar wrong candidates for each query.

    sim: ``[Q, C]`` dual-encoder similarities; positives: ``[Q, C]`` boolean,
    true where a candidate matches the query. Returns ``[Q, pool]`` candidate
    indices, hardest first.
    """
    masked = sim.masked_fill(positives, float("-inf"))
    return masked.topk(pool, dim=1).indices


def sample_negatives(
    pools: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n`` distinct negatives per row uniformly from each row's pool."""
    q, p = pools.shape
    if n > p:
        raise ValueError(f"cannot draw {n} negatives from a pool of {p}")
    keys = torch.rand(q, p, generator=generator, device=pools.device)
    pick = keys.argsort(dim=1)[:, :n]
    return pools.gather(1, pick)


def matching_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Binary image-text matching loss (ITM): positives 1, negatives 0.

    The two classes are weighted equally whatever the number of negatives.
    """
    pos = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits))
    neg = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    return 0.5 * (pos + neg)


def ranking_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Listwise contrastive term: the positive must outscore its own negatives.

    pos_logits: ``[B]``; neg_logits: ``[B, M]``, the negatives of each row.
    """
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def pair_batch(texts: torch.Tensor, text_image: torch.Tensor, pool_t2i: torch.Tensor, pool_i2t: torch.Tensor,
               n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image ids, caption ids) of the pairs one training step scores, in the
    layout :func:`pair_batch_loss` reads: the ``B`` matching pairs, then each
    caption with ``n`` images from its pool (``pool_t2i``), then each
    caption's image with ``n`` captions from the image's pool (``pool_i2t``)."""
    images = text_image[texts]
    neg_images = sample_negatives(pool_t2i[texts], n, generator)
    neg_texts = sample_negatives(pool_i2t[images], n, generator)
    return (torch.cat([images, neg_images.reshape(-1), images.repeat_interleave(n)]),
            torch.cat([texts, texts.repeat_interleave(n), neg_texts.reshape(-1)]))


def pair_batch_loss(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Matching loss over all pairs of a :func:`pair_batch` plus half the
    ranking loss of each caption against its wrong images and wrong captions."""
    bsz = len(logits) // (1 + 2 * n)
    pos = logits[:bsz]
    neg_img = logits[bsz : bsz + bsz * n].view(bsz, n)
    neg_txt = logits[bsz + bsz * n :].view(bsz, n)
    loss = matching_loss(pos, torch.cat([neg_img, neg_txt], 1).reshape(-1))
    return loss + 0.5 * (ranking_loss(pos, neg_img) + ranking_loss(pos, neg_txt))
