"""Retune a checkpoint's reranker on the features the engine itself uses.

The reranker of `xmr train` learns on features and negatives of the training
run: one view per image, negatives mined by the raw dual-encoder similarity.
The engine recalls with other scores (several views, query-bank corrected),
so the pairs the reranker sees at query time differ from the ones it learned
on. Retuning continues its training on exactly what the engine produces:
image embeddings from the model's views, region tokens as stored in an index,
and negatives drawn from the top ``pool`` candidates of the engine's corrected
recall scores (a wide pool: the very top of the train split is mostly
near-duplicates of the positive, session 3 measured it).

The region projection stays fixed, so the tokens already stored in indexes
built with the checkpoint stay valid. The epoch with the best dev rsum (at the
fusion weight chosen for it) is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reranker.losses import mine_hard_negatives, pair_batch, pair_batch_loss

from .rerank import candidate_logits, choose_fusion_weight

log = logging.getLogger(__name__)


@dataclass
class RetuneOptions:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 128
    n_negatives: int = 3
    pool: int = 256
    weight_decay: float = 0.05
    select_k: int = 20
    # captions of each image an epoch visits (None: all); fewer make an epoch cheaper on a CPU
    captions_per_image: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineFeatures:
    """One split as the engine sees it (CPU tensors)."""

    img: torch.Tensor  # [N, D] normalised, the model's views
    tokens: torch.Tensor  # [N, R, W] fp16 region tokens (first view), as stored in an index
    txt: torch.Tensor  # [T, D]
    words: torch.Tensor  # [T, L, H] fp16
    mask: torch.Tensor  # [T, L]
    text_image: torch.Tensor  # [T] image of each caption
    image_bias: torch.Tensor  # [N] query-bank biases (zeros without a bank)
    text_bias: torch.Tensor  # [T]
    recall_txt: torch.Tensor  # [T] the captions as recall scores them (after the text memory)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cosine, image->text, text->image) scores ``[N, T]``; the last two as the engine ranks."""
        recall = self.img @ self.recall_txt.T
        return self.img @ self.txt.T, recall - self.text_bias[None, :], recall - self.image_bias[:, None]


def engine_features(enc, images: list, captions: list[list[str]], batch: int = 64, progress=None) -> EngineFeatures:
    """Features of prepared images (``enc.prepare`` output) and their captions."""
    embs, toks = [], []
    for s in range(0, len(images), batch):
        e, t = enc.encode_images_with_tokens(images[s : s + batch])
        embs.append(e)
        toks.append(t)
        if progress:
            progress(len(images[s : s + batch]))
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
    txt, words, masks = caption_states(enc, [c for caps in captions for c in caps])
    img = torch.from_numpy(np.concatenate(embs)).float()
    bank = enc.querybank
    recall_txt = torch.from_numpy(bank.expand(txt.numpy())).float() if bank else txt
    ib = torch.from_numpy(bank.image_bias(img.numpy())).float() if bank else torch.zeros(len(img))
    tb = torch.from_numpy(bank.text_bias(recall_txt.numpy())).float() if bank else torch.zeros(len(txt))
    return EngineFeatures(img, torch.from_numpy(np.concatenate(toks)), txt, words.half(), masks, owner, ib, tb,
                          recall_txt)


def crossfit_features(enc, images: list, captions: list[list[str]], folds: int, head_opts=None, batch: int = 32,
                      progress=None) -> EngineFeatures:
    """Train-split features whose image embeddings are cross-fitted
    (``crossfit.py``): each image embedded by an image head that never saw
    it. Recall is the plain cosine (the query bank and text memory are built
    from these very captions, so on them they would leak the answer)."""
    from .crossfit import crossfit_embeddings
    from .wise import WiseOptions

    pooled, tokens = tower_pass(enc, images, batch, progress)
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
    txt, words, masks = caption_states(enc, [c for caps in captions for c in caps])
    opts = head_opts or WiseOptions(epochs=4, lr=1e-3)
    img = torch.from_numpy(crossfit_embeddings(enc.model, pooled, txt, owner.numpy(), folds, opts))
    zeros_i, zeros_t = torch.zeros(len(img)), torch.zeros(len(txt))
    return EngineFeatures(img, tokens, txt, words.half(), masks, owner, zeros_i, zeros_t, txt)


@torch.no_grad()
def tower_pass(enc, images: list, batch: int = 32, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled tower features ``[N, V, C]`` of each of the encoder's views,
    region tokens ``[N, R, W]`` fp16 of the first view, as an index stores
    them) of prepared images, through the PyTorch model on the CPU."""
    from ..encoders.preprocess import view_batches

    model, rr = enc.model.float().eval(), enc.reranker_model.float().eval()
    pooled, tokens = [], []
    for s in range(0, len(images), batch):
        px = torch.from_numpy(np.stack(images[s : s + batch]))
        views = []
        for n, (_, pixels) in enumerate(view_batches(px, enc.views)):
            p, levels = model.tower_features(model.normalize_pixels(pixels), with_regions=n == 0)
            views.append(p)
            if n == 0:
                tokens.append(rr.project_regions([lv.float() for lv in levels]).half())
        pooled.append(torch.stack(views, 1))
        if progress:
            progress(len(px))
    return torch.cat(pooled), torch.cat(tokens)


def caption_states(enc, texts: list[str], batch: int = 256):
    """(embeddings ``[T, D]``, word states ``[T, L, H]``, mask ``[T, L]``) as
    float CPU tensors, every row padded to the model's ``text_max_len``."""
    max_len = enc.model.config.text_max_len
    txt, words, masks = [], [], []
    for s in range(0, len(texts), batch):
        e, w, m = enc.text_states(texts[s : s + batch])
        pad = max_len - w.shape[1]
        txt.append(e.cpu().float())
        words.append(F.pad(w.cpu().float(), (0, 0, 0, pad)))
        masks.append(F.pad(m.cpu(), (0, pad)))
    return torch.cat(txt), torch.cat(words), torch.cat(masks)


def _score(reranker, f: EngineFeatures, img_idx: torch.Tensor, txt_idx: torch.Tensor, chunk: int = 2048):
    out = []
    for s in range(0, len(img_idx), chunk):
        i, t = img_idx[s : s + chunk], txt_idx[s : s + chunk]
        mask = f.mask[t]
        n = int(mask.sum(1).max())  # padding past the longest caption of the chunk changes nothing
        out.append(reranker(f.tokens[i].float(), f.words[t, :n].float(), mask[:, :n], f.img[i], f.txt[t]))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def engine_candidates(reranker, f: EngineFeatures, k: int) -> dict:
    """Rerank logits of each image's top-k captions and each caption's top-k
    images by the engine's recall scores, in the form ``fused_report`` takes."""
    reranker.eval()
    return candidate_logits(*f.scores(), k, lambda i, t: _score(reranker, f, i, t))


def evaluate(reranker, f: EngineFeatures, k: int) -> tuple[float, dict]:
    """(fusion weight, report) of the best fusion weight on ``f``."""
    return choose_fusion_weight(engine_candidates(reranker, f, k), f.text_image.numpy())


def epoch_captions(text_image: torch.Tensor, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """Caption ids of one epoch in random order: ``per_image`` captions of
    each image drawn at random (all of an image that has fewer)."""
    keys = torch.rand(len(text_image), generator=gen)
    order = torch.argsort(keys)
    by_image = order[torch.argsort(text_image[order], stable=True)]  # grouped by image, random within
    first = torch.searchsorted(text_image[by_image], text_image[by_image], right=False)
    rank = torch.arange(len(by_image)) - first
    picked = by_image[rank < per_image]
    return picked[torch.randperm(len(picked), generator=gen)]


def retune(reranker, train: EngineFeatures, dev: EngineFeatures, opts: RetuneOptions, progress=None) -> dict:
    """Train in place (region projection frozen); keep the best dev epoch, or
    the starting weights when no epoch beats them."""
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    _, s_i2t, s_t2i = train.scores()
    positives = train.text_image[None, :] == torch.arange(s_i2t.shape[0])[:, None]
    pool_t = min(opts.pool, s_i2t.shape[1] - int(positives.sum(1).max()))
    pool_i = min(opts.pool, s_i2t.shape[0] - 1)
    pool_i2t = mine_hard_negatives(s_i2t, positives, pool_t)  # captions for each image
    pool_t2i = mine_hard_negatives(s_t2i.T, positives.T, pool_i)  # images for each caption
    del s_i2t, s_t2i, positives
    params = [p for n, p in reranker.named_parameters() if not n.startswith("level_proj.")]
    for p in reranker.level_proj.parameters():
        p.requires_grad_(False)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    per_image = opts.captions_per_image

    def epoch_order() -> torch.Tensor:
        if per_image is None:
            return torch.randperm(len(train.txt), generator=gen)
        return epoch_captions(train.text_image, per_image, gen)

    n_texts = len(train.txt) if per_image is None else \
        int(torch.bincount(train.text_image).clamp(max=per_image).sum())
    steps = max(1, n_texts // opts.batch_size)
    total = steps * opts.epochs
    weight, report = evaluate(reranker, dev, opts.select_k)
    start = {"epoch": 0, "dev": report, "fusion_weight": weight}
    log.info("retune: dev rsum@%d before %.1f (w=%s)", opts.select_k, report["rsum"], weight)
    best, best_state, history = start, copy.deepcopy(reranker.state_dict()), [start]
    step = 0
    for epoch in range(opts.epochs):
        reranker.train()
        perm = epoch_order()
        t0, losses = time.time(), []
        for b in range(steps):
            t = perm[b * opts.batch_size : (b + 1) * opts.batch_size]
            img_idx, txt_idx = pair_batch(t, train.text_image, pool_t2i, pool_i2t, opts.n_negatives, gen)
            for g in optim.param_groups:
                g["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = pair_batch_loss(_score(reranker, train, img_idx, txt_idx), opts.n_negatives)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optim.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(epoch, b, steps, losses[-1])
        weight, report = evaluate(reranker, dev, opts.select_k)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "dev": report, "fusion_weight": weight,
                 "seconds": round(time.time() - t0, 1)}
        history.append(entry)
        log.info("retune epoch %d loss %.4f dev rsum@%d %.1f (w=%s)", epoch + 1, entry["loss"], opts.select_k,
                 report["rsum"], weight)
        if report["rsum"] > best["dev"]["rsum"]:
            best, best_state = entry, copy.deepcopy(reranker.state_dict())
    reranker.load_state_dict(best_state)
    reranker.eval()
    return {"history": history, "best": best}


def retune_in_place(ckpt, dataset: str, images: str | None = None, opts: RetuneOptions | None = None,
                    limit: int | None = None, progress_factory=None, source=None, folds: int = 0) -> dict:
    """Retune the reranker of checkpoint folder ``ckpt`` on the dataset's train
    split (dev selects) and save it there with the chosen fusion weight
    (``xmr train``'s retune stage); returns the summary written to its
    config. ``source`` names the checkpoint it was copied from, if any.
    ``folds`` > 1 trains on cross-fitted image embeddings of the train split
    (:func:`crossfit_features`; models with an image head on a pooled tower)."""
    from ..encoders import checkpoint
    from ..encoders.xmr import XmrEncoder
    from ..errors import CheckpointError
    from .data import StepProgress, load_pixels, retuning_splits

    opts = opts or RetuneOptions()
    source = ckpt if source is None else source
    if "reranker" not in checkpoint.read_config(ckpt):
        raise CheckpointError(f"{source}: holds no reranker to retune")
    enc = XmrEncoder.from_checkpoint(str(ckpt))
    feats = {}
    for split, recs in retuning_splits(dataset, images, limit).items():
        bar = progress_factory(f"features {split}", len(recs)) if progress_factory else None
        pixels = load_pixels([r.path for r in recs], enc.input_size)  # what enc.prepare makes of each
        captions, update = [r.captions for r in recs], bar.update if bar else None
        if split == "train" and folds > 1:
            feats[split] = crossfit_features(enc, pixels, captions, folds, progress=update)
        else:
            feats[split] = engine_features(enc, pixels, captions, progress=update)
        if bar:
            bar.close()
    progress = StepProgress(progress_factory, "retune", opts.epochs)
    t0 = time.time()
    result = retune(enc.reranker_model, feats["train"], feats["dev"], opts, progress)
    progress.close()
    best = result["best"]
    summary = {"source": str(source), "dataset": str(dataset),
               "options": opts.to_dict(), "limit": limit, "crossfit_folds": folds,
               "views": list(enc.views), "image_backend": enc.image_backend,
               "best_epoch": best["epoch"], "fusion_weight": best["fusion_weight"],
               "dev_before": result["history"][0]["dev"], "dev_after": best["dev"],
               "history": [{k: v for k, v in h.items() if k != "dev"} | {"dev_rsum": h["dev"]["rsum"]}
                           for h in result["history"]],
               "seconds": round(time.time() - t0, 1)}
    checkpoint.save_checkpoint(ckpt, {"fusion_weight": best["fusion_weight"], "reranker_retune": summary},
                               reranker=enc.reranker_model)
    return summary


def retune_checkpoint(src, out, dataset: str, images: str | None = None, opts: RetuneOptions | None = None,
                      limit: int | None = None, progress_factory=None, reranker_from=None, folds: int = 0) -> dict:
    """Copy checkpoint ``src`` to ``out`` and retune the copy's reranker
    (``xmr retune-reranker``); ``reranker_from``: a checkpoint whose reranker
    the copy starts from instead of its own (or for a model without one)."""
    from ..encoders import checkpoint
    from ..errors import CheckpointError

    if reranker_from is None and "reranker" not in checkpoint.read_config(src):
        raise CheckpointError(f"{src}: holds no reranker to retune; start from another checkpoint's "
                              "with --reranker-from")
    if reranker_from is not None:
        check_reranker_fits(src, reranker_from)
    checkpoint.copy_checkpoint(src, out)
    if reranker_from is not None:
        checkpoint.save_checkpoint(out, {"fusion_weight": checkpoint.read_config(reranker_from).get("fusion_weight", 0.0)},
                                   reranker=checkpoint.load_reranker(reranker_from))
    return retune_in_place(out, dataset, images, opts, limit, progress_factory, source=src, folds=folds)


def check_reranker_fits(model_dir, reranker_dir) -> None:
    """Refuse a reranker whose inputs (region levels, word states, joint
    embedding) do not have the shapes the model's towers and heads give."""
    from ..encoders import checkpoint
    from ..errors import CheckpointError

    source = checkpoint.read_config(reranker_dir)
    if "reranker" not in source:
        raise CheckpointError(f"{reranker_dir}: holds no reranker")
    model, src = checkpoint.read_config(model_dir)["model"], source["model"]
    same = all(model.get(k) == src.get(k) for k in ("image_tower", "embed_dim", "region_grid", "text_max_len"))
    if not same:
        raise CheckpointError(f"{reranker_dir}: its reranker was made for another image tower or embedding "
                              f"size than {model_dir}'s; train one with `xmr train --stages rerank`")
