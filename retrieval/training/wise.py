"""``xmr wise-ft``: give a fine-tuned model back what its image tower knew.

Fine-tuning the image tower on 6,000 Flickr8k photos made it forget most of
ImageNet (zero-shot Imagenette 97.6 -> 57.9). Two measures, one tower pass:

1. **Weight interpolation** (WiSE-FT, Wortsman et al. 2022): the tower
   becomes ``(1 - alpha) * pretrained + alpha * fine-tuned``, which keeps
   most of the fine-tuned tower's fit and most of the pretrained one's
   knowledge. The image head is trained again on the new tower's features
   (cached, ``features.py``) against the model's own text side, which stays
   exactly as it was (so do its query bank's captions).
2. **An ImageNet class channel**: the pretrained classifier runs on the
   interpolated tower's pooled features, and its class distribution weighs
   the text side's embeddings of the 1,000 class prompts, whitened (the
   prompts share "a photo of a", so unwhitened they all look alike) and
   centred. ``XmrDualModel.project_image`` adds this, times a gain, to the
   image embedding. For each gain and softmax temperature the image head is
   trained with the channel in place, and the setting is chosen on dev
   (:func:`choose`): the best mean zero-shot top-1 of the ``--classes`` sets
   among the settings whose Flickr8k dev rsum (as the engine scores it, with
   the rebuilt query bank and text memory) stays within the noise of the
   best one.

The reranker of the source model read region tokens of the old tower; it is
not carried over (retrain it on the new tower). The query bank's images are
embedded again through the new image side.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import load_dataset, split_records
from ..encoders import checkpoint
from ..encoders.base import embed_by_length
from ..encoders.querybank import QueryBank, bank_rows
from ..encoders.xmr_model import XmrDualModel, XmrModelConfig, build_image_tower
from ..evaluation import with_bar
from ..metrics import retrieval_report
from .calibrate import corrected_scores
from .features import cached_images
from .heads_job import EVAL_VIEWS, ZERO_SHOT_TEMPLATE, extra_caption_pairs
from .locked import CLASS_TEMPLATES, caption_batches, class_names, head_state, image_embeddings, symmetric_infonce

log = logging.getLogger(__name__)


@dataclass
class WiseOptions:
    alpha: float = 0.5  # weight of the fine-tuned tower (1: as fine-tuned, 0: as pretrained)
    epochs: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_size: int = 256
    random_views: int = 1
    whitening: float = 0.1  # ridge of the class prompts' covariance, as a fraction of its mean eigenvalue
    gains: tuple[float, ...] = (0.0, 0.3, 0.5, 0.8)
    temperatures: tuple[float, ...] = (1.0,)
    # how far below the best dev rsum a setting may fall for more zero-shot
    # accuracy: about the 95% interval of a dev comparison (benchmarks/RESULTS.md 1d)
    max_dev_drop: float = 4.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WiseJob:
    model_dir: str
    dataset: str
    out_dir: str
    cache_dir: str
    images: str | None = None
    extra_captions: list[str] = field(default_factory=list)
    class_sets: list[str] = field(default_factory=list)
    options: WiseOptions = field(default_factory=WiseOptions)


def interpolate_tower(model: XmrDualModel, alpha: float) -> None:
    """Move the image tower to ``(1 - alpha) * pretrained + alpha * current``."""
    pretrained = build_image_tower(model.config.image_tower).state_dict()
    own = model.image_tower.state_dict()
    mixed = {k: ((1 - alpha) * pretrained[k].float() + alpha * v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in own.items()}
    model.image_tower.load_state_dict(mixed)


def whitened_classes(text_emb: torch.Tensor, ridge: float) -> torch.Tensor:
    """Class prompt embeddings centred and whitened: ``(E - mean) @ inv(cov + r I)``
    with ``r = ridge * trace(cov) / dim``."""
    centred = text_emb - text_emb.mean(0)
    cov = centred.T @ centred / len(text_emb)
    r = ridge * torch.trace(cov) / cov.shape[0]
    return centred @ torch.linalg.inv(cov + r * torch.eye(cov.shape[0]))


def load_source(model_dir: str) -> XmrDualModel:
    """The source checkpoint's dual model rebuilt with the class channel (its
    classifier: the tower package's pretrained ImageNet head)."""
    meta = checkpoint.read_config(model_dir)
    config = XmrModelConfig.from_dict({**meta["model"], "imagenet_channel": True})
    model = XmrDualModel(config)  # pretrained towers: the classifier is ImageNet's
    src = checkpoint.load_dual(model_dir)
    state = src.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    return model.eval()


@torch.no_grad()
def text_embeddings(model: XmrDualModel, texts: list[str], batch: int = 64) -> torch.Tensor:
    """Normalised joint embeddings of ``texts`` through the model's text side."""
    from ..encoders.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer()

    def embed(part: list[str]) -> np.ndarray:
        ids, mask = tok(part, model.config.text_max_len)
        return F.normalize(model.text_forward(ids, mask)[0], dim=-1).numpy()

    return torch.from_numpy(embed_by_length(texts, batch, embed))


@torch.no_grad()
def _image_embeddings(model: XmrDualModel, pooled: torch.Tensor) -> np.ndarray:
    return image_embeddings(model, pooled).numpy()


def fit_image_head(model: XmrDualModel, pooled: torch.Tensor, text: torch.Tensor, owner: np.ndarray,
                   opts: WiseOptions) -> list[dict]:
    """Symmetric InfoNCE of the image head (linear and MLP) against fixed text
    embeddings, with the class channel as it is set (its gain and temperature
    stay; the head learns to work beside it)."""
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    params = list(model.image_head.parameters()) + (list(model.image_mlp.parameters()) if model.image_mlp else [])
    for p in model.parameters():
        p.requires_grad = False
    for p in params:
        p.requires_grad = True
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    steps = opts.epochs * math.ceil(len(text) / opts.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.lr, total_steps=max(1, steps), pct_start=0.05)
    scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
    history = []
    model.train()
    for epoch in range(1, opts.epochs + 1):
        t0, losses = time.time(), []
        for idx, rows, views in caption_batches(owner, pooled.shape[1], opts.batch_size, rng):
            loss = symmetric_infonce(model.project_image(pooled[rows, views]), text[idx], scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "seconds": round(time.time() - t0, 1)})
        log.info("image head epoch %d: %s", epoch, history[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return history


def choose(rows: list[dict], max_dev_drop: float) -> dict:
    """The setting with the best zero-shot mean among those whose dev rsum is
    within ``max_dev_drop`` of the best dev rsum (Flickr8k is not given up
    beyond the noise of a dev comparison); ties and no class sets: dev."""
    top = max(r["dev_rsum"] for r in rows)
    eligible = [r for r in rows if r["dev_rsum"] >= top - max_dev_drop]
    return max(eligible, key=lambda r: (r.get("zeroshot_mean", 0.0), r["dev_rsum"]))


def run(job: WiseJob, progress=None) -> dict:
    from ..zeroshot import ClassSet

    opts = job.options
    t0 = time.time()
    checkpoint.require_new_folder(job.out_dir)  # before the work, not after it
    meta = checkpoint.read_config(job.model_dir)
    model = load_source(job.model_dir)
    interpolate_tower(model, opts.alpha)
    cache = Path(job.cache_dir)
    tag = f"{checkpoint.image_weights_digest(job.model_dir)[:12]}-wise{opts.alpha:g}"

    def feats(desc, paths, views, n_random=0):
        pooled = with_bar(progress, desc, len(paths), lambda update: cached_images(
            cache, model, paths, views, n_random, opts.seed, update, weights=tag))
        return torch.from_numpy(pooled.astype(np.float32))

    records = load_dataset(job.dataset, job.images)
    train, dev = split_records(records, "train"), split_records(records, "dev")
    train_pooled = feats("train features", [os.path.abspath(r.path) for r in train], EVAL_VIEWS, opts.random_views)
    dev_pooled = feats("dev features", [os.path.abspath(r.path) for r in dev], EVAL_VIEWS)
    caps = [(row, c) for row, r in enumerate(train) for c in r.captions]
    n_own = len(caps)
    caps += extra_caption_pairs([r.filename for r in train], job.extra_captions)
    text = text_embeddings(model, [c for _, c in caps])
    owner = np.array([r for r, _ in caps])
    dev_caps = [(row, c) for row, r in enumerate(dev) for c in r.captions]
    dev_text = text_embeddings(model, [c for _, c in dev_caps]).numpy()
    dev_owner = np.array([r for r, _ in dev_caps])
    prompts = text_embeddings(model, [t.format(n) for n in class_names() for t in CLASS_TEMPLATES])
    prompts = F.normalize(prompts.reshape(-1, len(CLASS_TEMPLATES), prompts.shape[1]).mean(1), dim=-1)
    with torch.no_grad():
        model.class_embed.copy_(whitened_classes(prompts, opts.whitening))
    sets = []
    for folder in job.class_sets:
        data = ClassSet.from_folder(folder)
        sets.append((Path(folder).name, feats(f"{Path(folder).name} features", [p for p, _ in data.images], EVAL_VIEWS),
                     np.array([c for _, c in data.images]),
                     text_embeddings(model, [ZERO_SHOT_TEMPLATE.format(c) for c in data.classes]).numpy()))
    source = head_state(model)  # every setting's head starts from the source model's

    # the query bank: its captions as they were (same text side), its images through the new image side
    like = QueryBank.load(job.model_dir, **meta["querybank"]) if meta.get("querybank") else None
    memory = None
    if like is not None and meta.get("text_memory"):
        from ..encoders.memory import MemorySettings

        memory = MemorySettings(**meta["text_memory"])
    keep = bank_rows(np.array([r for r, _ in caps[:n_own]]))

    def bank_for():
        if like is None:
            return None
        images = _image_embeddings(model, train_pooled[:, : len(EVAL_VIEWS)])
        return QueryBank(text[keep].numpy(), images, like.beta, like.alpha, owner[keep], memory)

    rows, states = [], []
    for temp in opts.temperatures:
        for gain in opts.gains:
            model.load_state_dict(source, strict=False)
            with torch.no_grad():
                model.class_log_temp.fill_(math.log(temp))
                model.class_gain.fill_(gain)
            history = fit_image_head(model, train_pooled, text, owner, opts)
            bank = bank_for()
            img = _image_embeddings(model, dev_pooled)
            i2t, t2i = corrected_scores(bank, img, dev_text)
            row = {"temperature": temp, "gain": gain, "image_head_loss": history[-1]["loss"],
                   "dev_rsum": round(retrieval_report(i2t, dev_owner, sim_t2i=t2i)["rsum"], 2)}
            for name, pooled, labels, prompts_set in sets:
                i2c, _ = corrected_scores(bank, _image_embeddings(model, pooled), prompts_set)
                row[name] = round(100.0 * float((i2c.argmax(1) == labels).mean()), 2)
            if sets:
                row["zeroshot_mean"] = round(float(np.mean([row[s[0]] for s in sets])), 2)
            rows.append(row)
            log.info("channel %s", row)
            states.append((bank, head_state(model)))  # the towers are the same for every setting
    row = choose(rows, opts.max_dev_drop)
    bank, state = states[rows.index(row)]
    model.load_state_dict(state, strict=False)
    report = {"source": str(job.model_dir), "options": opts.to_dict(),
              "captions": len(caps), "extra_captions": [str(p) for p in job.extra_captions],
              "class_sets": [str(p) for p in job.class_sets], "selection": rows, "chosen": row,
              "seconds": round(time.time() - t0, 1)}
    write(job, model, meta, bank, report)
    return report


def write(job: WiseJob, model: XmrDualModel, meta: dict, bank: QueryBank | None, report: dict) -> None:
    """The new checkpoint (``run`` checked that its folder is new): the
    source's text side and settings, the new image side, the rebuilt bank; no
    reranker and no int8 graph (``xmr quantize``)."""
    out = Path(job.out_dir)
    keep = {k: v for k, v in meta.items() if k in ("format", "version", "views", "querybank", "text_memory")}
    config = copy.deepcopy(keep)
    config.update({
        "name": out.name, "fusion_weight": 0.0,
        "description": (f"{meta.get('name', 'source')} with its image tower interpolated towards the pretrained "
                        f"one (WiSE-FT, alpha {job.options.alpha:g}), the image head retrained, and the tower's "
                        "ImageNet classifier as a class channel"),
        "wise_ft": report,
    })
    checkpoint.save_checkpoint(out, {**config, "format": checkpoint.FORMAT, "version": checkpoint.VERSION},
                               dual=model)
    if bank is not None:
        bank.save(out)
