"""Training and evaluating the cross-modal reranker on top of a frozen dual
encoder: features are extracted once, negatives mined by the dual encoder."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from reranker.losses import mine_hard_negatives, pair_batch, pair_batch_loss

from ..metrics import apply_rerank, retrieval_report
from .data import SplitData
from .dual import _autocast, encode_split

log = logging.getLogger(__name__)

FUSION_WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


@dataclass
class RerankTrainOptions:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.05
    n_negatives: int = 3
    pool: int = 32
    hard_negatives: bool = True
    select_k: int = 20
    seed: int = 0


@dataclass
class Features:
    """Frozen dual-encoder outputs of one split, on one device."""

    img_emb: torch.Tensor  # [N, D]
    txt_emb: torch.Tensor  # [T, D]
    levels: list[torch.Tensor]  # [N, R_l, C_l] fp16
    words: torch.Tensor  # [T, L, H] fp16
    mask: torch.Tensor  # [T, L]
    text_image: torch.Tensor  # [T]

    def sim(self) -> torch.Tensor:
        return self.img_emb @ self.txt_emb.t()


def extract_features(model, data: SplitData, device) -> Features:
    img, txt, levels, words = encode_split(model, data, device, with_regions=True)
    return Features(img, txt, levels, words, data.attention_mask.to(device), data.text_image.to(device))


def score_pairs(reranker, f: Features, img_idx: torch.Tensor, txt_idx: torch.Tensor, chunk: int = 4096):
    out = []
    device = f.img_emb.device
    for s in range(0, len(img_idx), chunk):
        i = img_idx[s : s + chunk]
        t = txt_idx[s : s + chunk]
        with _autocast(device):
            regions = reranker.project_regions([lv[i].float() for lv in f.levels])
            out.append(reranker(regions, f.words[t].float(), f.mask[t], f.img_emb[i], f.txt_emb[t]).float())
    return torch.cat(out) if out else torch.zeros(0, device=device)


@torch.no_grad()
def rerank_candidates(reranker, f: Features, k: int, bank=None) -> dict:
    """Rerank logits for each image's top-k captions and each caption's top-k
    images, recalled by the scores the engine uses (query-bank corrected when
    ``bank`` is given)."""
    reranker.eval()
    sim = f.sim().float()
    s_i2t, s_t2i = sim, sim
    if bank is not None:  # the engine's recall scores: text memory, then bias
        from .calibrate import corrected_scores

        s_i2t, s_t2i = (torch.from_numpy(s).to(sim.device) for s in corrected_scores(
            bank, f.img_emb.float().cpu().numpy(), f.txt_emb.float().cpu().numpy()))
    return candidate_logits(sim, s_i2t, s_t2i, k, lambda i, t: score_pairs(reranker, f, i, t))


def candidate_logits(sim: torch.Tensor, s_i2t: torch.Tensor, s_t2i: torch.Tensor, k: int, score) -> dict:
    """Rerank logits of each image's top-k captions by ``s_i2t`` and each
    caption's top-k images by ``s_t2i`` (all ``[N, T]``), scored by
    ``score(image ids, caption ids)``, in the form :func:`fused_report` takes."""
    k_t = min(k, sim.shape[1])
    k_i = min(k, sim.shape[0])
    i2t = s_i2t.topk(k_t, dim=1).indices.reshape(-1)  # captions, k per image
    t2i = s_t2i.t().topk(k_i, dim=1).indices.reshape(-1)  # images, k per caption
    n, t = sim.shape
    rows_i = torch.arange(n, device=sim.device).repeat_interleave(k_t)
    rows_t = torch.arange(t, device=sim.device).repeat_interleave(k_i)
    return {
        "sim": sim.cpu().numpy(),
        "recall": {"i2t": s_i2t.cpu().numpy(), "t2i": s_t2i.cpu().numpy()},
        "i2t": (rows_i.cpu().numpy(), i2t.cpu().numpy(), score(rows_i, i2t).float().cpu().numpy()),
        "t2i": (t2i.cpu().numpy(), rows_t.cpu().numpy(), score(t2i, rows_t).float().cpu().numpy()),
    }


def fused_report(cands: dict, text_image: np.ndarray, weight: float) -> dict:
    """Recall after reranking, with final score = rerank logit + weight * recall score.

    The recall score of a direction is ``cands["recall"][direction]`` when
    given (e.g. query-bank corrected scores), the dual similarity otherwise.
    """
    mats = []
    for key in ("i2t", "t2i"):
        recall = cands.get("recall", {}).get(key, cands["sim"])
        rows, cols, logits = cands[key]
        mats.append(apply_rerank(recall, rows, cols, logits + weight * recall[rows, cols]))
    return retrieval_report(mats[0], text_image, sim_t2i=mats[1])


def choose_fusion_weight(cands: dict, text_image: np.ndarray) -> tuple[float, dict]:
    best_w, best = None, None
    for w in FUSION_WEIGHTS:
        rep = fused_report(cands, text_image, w)
        if best is None or rep["rsum"] > best["rsum"]:
            best_w, best = w, rep
    return best_w, best


def train_reranker(reranker, train: Features, dev: Features, opts: RerankTrainOptions, device, progress=None,
                   bank=None) -> dict:
    """Train in place, keeping the epoch with the best dev rsum at ``select_k``
    (recalled and fused with the query-bank corrected scores when ``bank`` is given)."""
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    reranker.to(device)
    sim = train.sim()
    if not opts.hard_negatives:  # ablation: the same sampler over a random order
        sim = torch.rand(sim.shape, generator=gen).to(device)
    positives = train.text_image[None, :] == torch.arange(sim.shape[0], device=device)[:, None]
    max_pos_t = int(positives.sum(1).max())  # most captions of one image
    pool_i2t = mine_hard_negatives(sim, positives, min(opts.pool, sim.shape[1] - max_pos_t)).cpu()  # caption ids
    pool_t2i = mine_hard_negatives(sim.t(), positives.t(), min(opts.pool, sim.shape[0] - 1)).cpu()  # image ids
    del sim, positives
    optim = torch.optim.AdamW(reranker.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    n_texts = train.txt_emb.shape[0]
    text_image = train.text_image.cpu()
    steps_per_epoch = max(1, n_texts // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    warmup = min(200, total // 10 + 1)
    history, best, best_state = [], None, None
    step = 0
    for epoch in range(opts.epochs):
        reranker.train()
        perm = torch.randperm(n_texts, generator=gen)
        t0, losses = time.time(), []
        for b in range(steps_per_epoch):
            t = perm[b * opts.batch_size : (b + 1) * opts.batch_size]
            img_idx, txt_idx = pair_batch(t, text_image, pool_t2i, pool_i2t, opts.n_negatives, gen)
            img_idx, txt_idx = img_idx.to(device), txt_idx.to(device)
            f = 1.0 if step >= warmup else (step + 1) / warmup
            f *= 0.5 * (1 + math.cos(math.pi * step / total))
            for g in optim.param_groups:
                g["lr"] = opts.lr * f
            loss = pair_batch_loss(score_pairs(reranker, train, img_idx, txt_idx), opts.n_negatives)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reranker.parameters(), 2.0)
            optim.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(epoch, b, steps_per_epoch, losses[-1])
        cands = rerank_candidates(reranker, dev, opts.select_k, bank)
        weight, report = choose_fusion_weight(cands, dev.text_image.cpu().numpy())
        entry = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "dev": report,
                 "fusion_weight": weight, "seconds": time.time() - t0}
        history.append(entry)
        log.info("rerank epoch %d loss %.4f dev rsum@%d %.1f (w=%s, %.0fs)", epoch + 1, entry["loss"],
                 opts.select_k, report["rsum"], weight, entry["seconds"])
        if best is None or report["rsum"] > best["dev"]["rsum"]:
            best = entry
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in reranker.state_dict().items()})
    reranker.load_state_dict(best_state)
    return {"history": history, "best": best}
