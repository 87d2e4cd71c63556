"""Heads trained on towers that stay as pretrained (``xmr train-heads``).

The image tower keeps its ImageNet weights, classifier included, and the
text tower keeps all-MiniLM-L6-v2's: only the heads learn (LiT, Zhai et al.
2022: tuning the text side to a locked image tower transfers best). So the
model keeps what its towers know, every feature is computed once
(``features.py``), and an epoch over 57,000 captions takes seconds on a
CPU. The image side adds the tower's own ImageNet classifier as a second
channel: its class distribution weighs the joint embeddings of the 1,000
class names (``XmrDualModel.project_image``), which the text head makes
here from the frozen text tower's embeddings of their prompts.

Selection is on dev: Flickr8k dev recall and, where given, zero-shot
accuracy on labelled class folders (each epoch scores ``rsum / 6`` + the
mean top-1; both are percentages).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.xmr_model import XmrDualModel
from ..metrics import retrieval_report

log = logging.getLogger(__name__)

CLASS_NAMES_FILE = Path(__file__).with_name("imagenet_classes.txt")
CLASS_TEMPLATES = ("a photo of a {}.",)


@dataclass
class HeadOptions:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassSetFeatures:
    """A labelled dev set: image features and its class prompts' text features."""

    name: str
    pooled: np.ndarray  # [N, V, C]
    labels: np.ndarray  # [N]
    prompts: np.ndarray  # [K, H]


@dataclass
class HeadData:
    train_pooled: np.ndarray  # [N, V, C] views of each training image
    train_text: np.ndarray  # [T, H] caption features
    train_owner: np.ndarray  # [T] image row of each caption
    dev_pooled: np.ndarray  # [M, V', C] the test-time views
    dev_text: np.ndarray
    dev_owner: np.ndarray
    class_text: np.ndarray  # [1000, H] the ImageNet class prompts
    class_sets: list[ClassSetFeatures] = field(default_factory=list)


def class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the order of the towers' logits."""
    return [line.strip() for line in CLASS_NAMES_FILE.read_text().splitlines() if line.strip()]


def image_embeddings(model: XmrDualModel, pooled: torch.Tensor, class_embed=None) -> torch.Tensor:
    """Normalised sum of the views' normalised embeddings (as the engine indexes)."""
    total = sum(F.normalize(model.project_image(pooled[:, v], class_embed), dim=-1) for v in range(pooled.shape[1]))
    return F.normalize(total, dim=-1)


@torch.no_grad()
def evaluate(model: XmrDualModel, data: HeadData) -> dict:
    """Dev rsum (dual encoder, exact) and top-1 of each class set, in percent."""
    was = model.training
    model.eval()
    class_embed = _class_embed(model, data)
    img = image_embeddings(model, torch.from_numpy(data.dev_pooled).float(), class_embed)
    txt = F.normalize(model.project_text(torch.from_numpy(data.dev_text)), dim=-1)
    out = {"dev_rsum": round(retrieval_report((img @ txt.T).numpy(), data.dev_owner)["rsum"], 2)}
    for cs in data.class_sets:
        e = image_embeddings(model, torch.from_numpy(cs.pooled).float(), class_embed)
        t = F.normalize(model.project_text(torch.from_numpy(cs.prompts)), dim=-1)
        out[cs.name] = round(100.0 * float(((e @ t.T).argmax(1).numpy() == cs.labels).mean()), 2)
    if data.class_sets:
        out["zeroshot_mean"] = round(float(np.mean([out[cs.name] for cs in data.class_sets])), 2)
    out["score"] = round(out["dev_rsum"] / 6 + out.get("zeroshot_mean", 0.0), 2)
    model.train(was)
    return out


def _class_embed(model: XmrDualModel, data: HeadData):
    if not model.config.imagenet_channel:
        return None
    return model.project_text(torch.from_numpy(data.class_text))


def _parameters(model: XmrDualModel) -> list[torch.nn.Parameter]:
    params = [model.logit_scale]
    for name in ("image_head", "text_head", "image_mlp", "text_mlp"):
        part = getattr(model, name)
        if part is not None:
            params += list(part.parameters())
    if model.config.imagenet_channel:
        params += [model.class_log_temp, model.class_gain]
    return params


def caption_batches(owner: np.ndarray, n_views: int, batch_size: int, rng: np.random.Generator):
    """One epoch of ``(caption rows, their image rows, a random view of each)``
    batches in random order, one caption per image in a batch (so no batch
    holds a false negative). Every caption is visited; a batch left with
    fewer than two images is dropped."""
    perm = rng.permutation(len(owner))
    for s in range(0, len(owner), batch_size):
        idx = perm[s : s + batch_size]
        _, first = np.unique(owner[idx], return_index=True)
        idx = idx[first]
        if len(idx) >= 2:
            yield idx, owner[idx], rng.integers(0, n_views, len(idx))


def symmetric_infonce(img: torch.Tensor, txt: torch.Tensor, scale) -> torch.Tensor:
    """CLIP's loss: row i of ``img`` and ``txt`` are a pair, every other row a negative."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def fit_heads(model: XmrDualModel, data: HeadData, opts: HeadOptions, on_epoch=None) -> dict:
    """Train the heads with a symmetric InfoNCE loss (one caption per image in
    a batch, a random view of each image); keep the epoch of the best dev
    score. Returns the history and the best epoch; ``model`` ends with the
    best epoch's weights and its class embeddings stored."""
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    for p in model.parameters():
        p.requires_grad = False
    params = _parameters(model)
    for p in params:
        p.requires_grad = True
    pooled = torch.from_numpy(data.train_pooled)
    text = torch.from_numpy(data.train_text)
    owner = np.asarray(data.train_owner)
    steps_per_epoch = math.ceil(len(text) / opts.batch_size)  # an upper bound: short batches are dropped
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.lr, total_steps=max(1, opts.epochs * steps_per_epoch),
                                                pct_start=opts.warmup)
    history = [{"epoch": 0, **evaluate(model, data)}]
    best = (history[0]["score"], 0, head_state(model))
    model.train()
    for epoch in range(1, opts.epochs + 1):
        t0, losses = time.time(), []
        for idx, rows, views in caption_batches(owner, pooled.shape[1], opts.batch_size, rng):
            class_embed = _class_embed(model, data)
            img = model.project_image(pooled[rows, views].float(), class_embed)
            txt = model.project_text(text[idx])
            loss = symmetric_infonce(img, txt, model.logit_scale.exp().clamp(max=100.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        entry = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), **evaluate(model, data),
                 "seconds": round(time.time() - t0, 1)}
        history.append(entry)
        log.info("epoch %d: %s", epoch, entry)
        if on_epoch:
            on_epoch(entry)
        if entry["score"] > best[0]:
            best = (entry["score"], epoch, head_state(model))
    model.load_state_dict(best[2], strict=False)
    model.eval()
    store_class_embed(model, data.class_text)
    return {"history": history, "best_epoch": best[1], "options": opts.to_dict()}


@torch.no_grad()
def store_class_embed(model: XmrDualModel, class_text: np.ndarray) -> None:
    """Fix the class channel's joint embeddings as the text head makes them now."""
    if model.config.imagenet_channel:
        model.class_embed.copy_(model.project_text(torch.from_numpy(class_text)))


def head_state(model: XmrDualModel) -> dict:
    """A copy of everything but the towers (what training the heads changes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(("image_tower.",
                                                                                               "text_tower."))}


def initial_temperature(model: XmrDualModel, value: float) -> None:
    if model.config.imagenet_channel:
        with torch.no_grad():
            model.class_log_temp.fill_(math.log(value))
