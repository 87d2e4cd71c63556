"""Retune a checkpoint's text head against the image side it already ships.

The dual encoder trained its image tower and text side together on the same
train images, and the tower fits those closely (the dual encoder ranks a
train caption's own image first 72% of the time against 25% on dev): the
text side learned to meet image embeddings far more reliable than those of
a user's photos. Here the image side stays fixed (tower, int8 graph, every
stored vector) and only the text head, the linear map from the pooled
MiniLM states into the joint space, trains further, against what unseen
photos look like to the tower:

- targets are embeddings of random crops of the train images (a side of
  50-75% of the image, randomly mirrored) through the model's own image
  path; on such crops the tower is about as reliable as on unseen images;
- a caption's negatives are every train image (the targets are fixed, so
  the whole gallery fits in one product), an image's are every train
  caption as last embedded;
- captions are expanded by the text memory as the engine expands them (the
  nearest bank captions of other images vote with their images), so the
  head learns what recall will actually rank with.

The epoch with the best dev rsum through the engine's scoring (query bank,
text memory, the model's beta and alpha) is kept, and the query bank's
captions are embedded again with it. The word states the reranker reads do
not change, and since the image side is the same, indexes built with the
source model are brought up to the new one by ``xmr upgrade``.
"""

from __future__ import annotations

import copy
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.memory import expand_tensors
from ..encoders.querybank import QueryBank
from ..metrics import retrieval_report
from .calibrate import corrected_scores


@dataclass
class HeadOptions:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 256
    crops: int = 6  # random crops of each train image
    crop_side: tuple[float, float] = (0.5, 0.75)  # side of a crop, as a fraction of the image's
    warmup_steps: int = 50
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def crop_box(width: int, height: int, rng: np.random.Generator, side: tuple[float, float]):
    """A random box ``(left, top, right, bottom)``: side fraction in ``side``,
    aspect ratio in [3/4, 4/3], anywhere inside the image."""
    frac = rng.uniform(*side)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(1.0, frac * math.sqrt(aspect)) * width
    h = min(1.0, frac / math.sqrt(aspect)) * height
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return int(x0), int(y0), max(int(x0) + 1, int(x0 + w)), max(int(y0) + 1, int(y0 + h))


def random_crops(image, n: int, rng: np.random.Generator, side: tuple[float, float]) -> list:
    """``n`` random crops of a PIL image, each mirrored with probability 1/2."""
    from PIL import Image

    out = []
    for _ in range(n):
        crop = image.crop(crop_box(image.width, image.height, rng, side))
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def train_image_features(enc, paths: list, opts: HeadOptions, progress=None, chunk: int = 64):
    """What retuning needs of each train image, from one decode of it:
    ``[N, crops, D]`` normalised embeddings of random crops (one generator per
    image, seeded by ``opts.seed`` and its position) and ``[N, D]`` the
    image as the engine embeds it (the model's views)."""
    from indexer.decode import decode_image

    def one(i):
        image = decode_image(paths[i], enc.input_size).image
        rng = np.random.default_rng([opts.seed, i])
        return enc.prepare(image), [enc.prepare(c) for c in random_crops(image, opts.crops, rng, opts.crop_side)]

    targets = np.zeros((len(paths), opts.crops, enc.dim), np.float32)
    whole = np.zeros((len(paths), enc.dim), np.float32)
    with ThreadPoolExecutor(2) as pool:
        for s in range(0, len(paths), chunk):
            decoded = list(pool.map(one, range(s, min(s + chunk, len(paths)))))
            n = len(decoded)
            targets[s : s + n] = enc.encode_as_is([c for _, crops in decoded for c in crops]).reshape(n, opts.crops, -1)
            whole[s : s + n] = enc.encode_images([image for image, _ in decoded])
            if progress:
                progress(n)
    return torch.from_numpy(targets), whole


def pooled_states(enc, texts: list[str], batch: int = 256) -> torch.Tensor:
    """``[T, H]`` pooled text-tower states (what the text head maps), in input order."""
    from ..encoders.base import embed_by_length
    from ..encoders.xmr_model import mean_pool

    model = enc.model

    def embed(part):
        ids, mask = enc.tokenizer(part, model.config.text_max_len)
        ids, mask = ids.to(enc.device), mask.to(enc.device)
        with torch.inference_mode():
            return mean_pool(model.text_tower(ids, mask), mask).float().cpu().numpy()

    return torch.from_numpy(embed_by_length(texts, batch, embed))


@dataclass
class HeadData:
    """What retuning reads (CPU tensors)."""

    train_pooled: torch.Tensor  # [T, H]
    train_owner: torch.Tensor  # [T] train image of each caption
    targets: torch.Tensor  # [N, C, D] crop embeddings of the train images
    bank_rows: torch.Tensor  # [B] rows of the train captions kept in the query bank
    bank_images: np.ndarray  # [N, D] the train images as the engine embeds them
    dev_pooled: torch.Tensor
    dev_owner: np.ndarray
    dev_images: np.ndarray  # [Nd, D] as the engine embeds them


def _embed(head, pooled: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(head(pooled), dim=-1)


def make_bank(head, data: HeadData, like: QueryBank | None) -> QueryBank:
    """The query bank of the train split with captions embedded by ``head``
    (the settings of ``like``, the model's bank)."""
    texts = _embed(head, data.train_pooled[data.bank_rows]).numpy()
    owner = data.train_owner[data.bank_rows].numpy()
    beta, alpha, memory = (like.beta, like.alpha, like.memory) if like is not None else (15.0, 1.0, None)
    return QueryBank(texts, data.bank_images, beta, alpha, owner, memory)


def evaluate(head, data: HeadData, like: QueryBank | None) -> dict:
    """Dev recall as the engine scores it, with the bank embedded by ``head``."""
    txt = _embed(head, data.dev_pooled).numpy()
    bank = make_bank(head, data, like) if like is not None else None
    i2t, t2i = corrected_scores(bank, data.dev_images, txt)
    return retrieval_report(i2t, data.dev_owner, sim_t2i=t2i)


def retune_head(head: torch.nn.Linear, data: HeadData, like: QueryBank | None, logit_scale: float,
                opts: HeadOptions, progress=None) -> dict:
    """Train ``head`` in place; keeps the epoch with the best dev rsum (epoch 0:
    as it came). Returns ``{"history": [...], "best": entry}``."""
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    n_txt = len(data.train_owner)
    n_img, n_crops, _ = data.targets.shape
    memory = like.memory if like is not None else None
    bank_images = torch.from_numpy(np.ascontiguousarray(data.bank_images, np.float32))
    key_owner = data.train_owner[data.bank_rows]
    stale = _embed(head, data.train_pooled)  # every train caption as last embedded
    stale_expanded = (expand_tensors(stale, stale[data.bank_rows], bank_images, key_owner, memory, data.train_owner)
                      if memory else stale.clone())
    opt = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps = max(1, n_txt // opts.batch_size)
    total = steps * opts.epochs
    history = [{"epoch": 0, "loss": None, "dev": evaluate(head, data, like)}]
    best, best_state, step = history[0], copy.deepcopy(head.state_dict()), 0
    for epoch in range(opts.epochs):
        perm = torch.randperm(n_txt, generator=gen)
        t0, losses = time.time(), []
        for b in range(steps):
            warm = (step + 1) / opts.warmup_steps
            cos = 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = opts.lr * (warm if step < opts.warmup_steps else cos)
            idx = perm[b * opts.batch_size : (b + 1) * opts.batch_size]
            own = data.train_owner[idx]
            raw = F.normalize(head(data.train_pooled[idx]), dim=-1)
            t = expand_tensors(raw, stale[data.bank_rows], bank_images, key_owner, memory, own) if memory else raw
            gallery = data.targets[torch.arange(n_img), torch.randint(0, n_crops, (n_img,), generator=gen)]
            loss = F.cross_entropy(logit_scale * t @ gallery.T, own)  # caption -> every train image
            # image -> every train caption: this batch's fresh, the rest as last embedded
            q = gallery[own]
            rest = (logit_scale * q @ stale_expanded.T).index_fill(1, idx, float("-inf"))
            rest = rest.masked_fill(own[:, None] == data.train_owner[None, :], float("-inf"))
            same = (own[:, None] == own[None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
            fresh = (logit_scale * q @ t.T).masked_fill(same, float("-inf"))
            loss = loss + F.cross_entropy(torch.cat([fresh, rest], 1), torch.arange(len(idx)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stale[idx], stale_expanded[idx] = raw.detach(), t.detach()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(epoch, b, steps, losses[-1])
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "dev": evaluate(head, data, like),
                 "seconds": round(time.time() - t0, 1)}
        history.append(entry)
        if entry["dev"]["rsum"] > best["dev"]["rsum"]:
            best, best_state = entry, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return {"history": history, "best": best}


def retune_text_head_in_place(ckpt, dataset: str, images: str | None = None, opts: HeadOptions | None = None,
                              limit: int | None = None, progress_factory=None, source=None) -> dict:
    """Retune the text head of checkpoint folder ``ckpt`` on the dataset's
    train split (dev selects) and save the head and the query bank it implies
    there (``xmr train``'s text_head stage); returns the summary written to
    its config. ``source`` names the checkpoint it was copied from, if any."""
    from ..encoders import checkpoint
    from ..encoders.querybank import bank_rows
    from ..encoders.xmr import XmrEncoder
    from .data import StepProgress, load_pixels, retuning_splits

    opts = opts or HeadOptions()
    source = ckpt if source is None else source
    enc = XmrEncoder.from_checkpoint(str(ckpt))
    recs = retuning_splits(dataset, images, limit)

    def bar(label, total):
        return progress_factory(label, total) if progress_factory else None

    def captions(split):
        texts = [c for r in recs[split] for c in r.captions]
        owner = torch.tensor([i for i, r in enumerate(recs[split]) for _ in r.captions], dtype=torch.long)
        return pooled_states(enc, texts), owner

    t0 = time.time()
    b = bar("train images and crops", len(recs["train"]))
    targets, train_images = train_image_features(enc, [r.path for r in recs["train"]], opts, b.update if b else None)
    if b:
        b.close()
    b = bar("images dev", len(recs["dev"]))
    pixels = load_pixels([r.path for r in recs["dev"]], enc.input_size)
    dev_images = np.zeros((len(pixels), enc.dim), np.float32)
    for s in range(0, len(pixels), 64):
        dev_images[s : s + 64] = enc.encode_images(list(pixels[s : s + 64]))
        if b:
            b.update(len(pixels[s : s + 64]))
    if b:
        b.close()
    train_pooled, train_owner = captions("train")
    dev_pooled, dev_owner = captions("dev")
    shipped = enc.querybank
    # the model's bank keeps the first two captions of each train image (select_inference --write-bank)
    keep = bank_rows(train_owner.numpy(), 2)
    data = HeadData(train_pooled, train_owner, targets, torch.from_numpy(keep), train_images,
                    dev_pooled, dev_owner.numpy(), dev_images)
    progress = StepProgress(progress_factory, "retune text head", opts.epochs)
    scale = float(enc.model.logit_scale.detach().exp().clamp(max=100.0))
    result = retune_head(enc.model.text_head, data, shipped, scale, opts, progress)
    progress.close()
    best = result["best"]
    summary = {"source": str(source), "dataset": str(dataset),
               "options": opts.to_dict(), "limit": limit,
               "views": list(enc.views), "image_backend": enc.image_backend, "logit_scale": round(scale, 3),
               "best_epoch": best["epoch"], "dev_before": result["history"][0]["dev"], "dev_after": best["dev"],
               "history": [{"epoch": h["epoch"], "loss": h["loss"], "dev_rsum": h["dev"]["rsum"]}
                           for h in result["history"]],
               "seconds": round(time.time() - t0, 1)}
    if shipped is not None:
        make_bank(enc.model.text_head, data, shipped).save(ckpt)
    checkpoint.save_text_side(ckpt, enc.model, {"text_head_retune": summary})
    return summary


def retune_text_head_checkpoint(src, out, dataset: str, images: str | None = None, opts: HeadOptions | None = None,
                                limit: int | None = None, progress_factory=None) -> dict:
    """Copy checkpoint ``src`` to ``out`` and retune the copy's text head
    (``xmr retune-text-head``)."""
    from ..encoders import checkpoint

    checkpoint.copy_checkpoint(src, out)
    return retune_text_head_in_place(out, dataset, images, opts, limit, progress_factory, source=src)
