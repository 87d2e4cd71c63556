"""``xmr train-heads``: gather the data of a locked-tower model (cached tower
features of a dataset's train and dev splits, extra captions of the train
images, labelled dev class folders), train its heads (``locked.py``) and
write the checkpoint."""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..datasets import load_dataset, split_records
from ..encoders import checkpoint
from ..encoders.xmr_model import XmrDualModel, XmrModelConfig
from ..errors import DatasetError
from ..evaluation import with_bar
from .features import cached_images, cached_texts
from .locked import CLASS_TEMPLATES, ClassSetFeatures, HeadData, HeadOptions, class_names, fit_heads, initial_temperature

log = logging.getLogger(__name__)

TRAIN_VIEWS = ("crop85", "crop85flip", "full", "flip")
EVAL_VIEWS = ("crop85", "crop85flip")
ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass
class HeadsJob:
    dataset: str
    out_dir: str
    cache_dir: str
    images: str | None = None
    extra_captions: list[str] = field(default_factory=list)
    class_sets: list[str] = field(default_factory=list)
    image_tower: str = "efficientnet-lite2"
    embed_dim: int = 256
    image_head_hidden: int = 1024
    text_head_hidden: int = 0
    imagenet_channel: bool = True
    class_temperature: float = 1.0
    random_views: int = 2
    limit: int | None = None
    options: HeadOptions = field(default_factory=HeadOptions)


def extra_caption_pairs(names: list[str], paths: list[str]) -> list[tuple[int, str]]:
    """``(image row, caption)`` for each row of the CSV files (``image,caption``)
    whose image is one of ``names``: the same file name, or the same Flickr
    photo id (Flickr30k names ``1000268201.jpg``, Flickr8k names
    ``1000268201_693b08cb0e.jpg``)."""
    by_key: dict[str, int] = {}
    for row, name in enumerate(names):
        by_key.setdefault(name, row)
        by_key.setdefault(Path(name).stem.split("_")[0], row)
    out = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                image, caption = (rec.get("image") or "").strip(), (rec.get("caption") or "").strip()
                if not caption:
                    continue
                row = by_key.get(image, by_key.get(Path(image).stem.split("_")[0]))
                if row is not None:
                    out.append((row, caption))
    return out


def build_model(job: HeadsJob) -> XmrDualModel:
    from ..encoders.xmr_model import IMAGE_TOWERS

    config = XmrModelConfig(image_tower=job.image_tower, image_size=IMAGE_TOWERS[job.image_tower][2],
                            embed_dim=job.embed_dim, text_trainable_layers=0, image_tower_locked=True,
                            image_head_hidden=job.image_head_hidden, text_head_hidden=job.text_head_hidden,
                            imagenet_channel=job.imagenet_channel)
    model = XmrDualModel(config).eval()
    initial_temperature(model, job.class_temperature)
    return model


def gather(job: HeadsJob, model: XmrDualModel, progress=None) -> HeadData:
    from ..zeroshot import ClassSet

    cache = Path(job.cache_dir)
    records = load_dataset(job.dataset, job.images)
    train, dev = split_records(records, "train"), split_records(records, "dev")
    if job.limit:
        train, dev = train[: job.limit], dev[: job.limit]

    def feats(desc, fn, total):
        return with_bar(progress, desc, total, fn)

    train_paths = [os.path.abspath(r.path) for r in train]
    train_pooled = feats("train image features", lambda p: cached_images(
        cache, model, train_paths, TRAIN_VIEWS, job.random_views, job.options.seed, p), len(train))
    texts = [(row, c) for row, r in enumerate(train) for c in r.captions]
    texts += extra_caption_pairs([r.filename for r in train], job.extra_captions)
    log.info("%d training captions (%d from extra files)", len(texts),
             len(texts) - sum(len(r.captions) for r in train))
    train_text = feats("caption features", lambda p: cached_texts(cache, model, [c for _, c in texts], p),
                       len(texts))
    dev_paths = [os.path.abspath(r.path) for r in dev]
    dev_pooled = feats("dev image features", lambda p: cached_images(cache, model, dev_paths, EVAL_VIEWS,
                                                                     progress=p), len(dev))
    dev_caps = [(row, c) for row, r in enumerate(dev) for c in r.captions]
    dev_text = cached_texts(cache, model, [c for _, c in dev_caps])
    prompts = [t.format(name) for name in class_names() for t in CLASS_TEMPLATES]
    class_text = cached_texts(cache, model, prompts).reshape(-1, len(CLASS_TEMPLATES), model.word_dim).mean(1)
    sets = []
    for folder in job.class_sets:
        data = ClassSet.from_folder(folder)
        paths = [p for p, _ in data.images]
        pooled = feats(f"{Path(folder).name} features", lambda p: cached_images(cache, model, paths, EVAL_VIEWS,
                                                                                 progress=p), len(paths))
        sets.append(ClassSetFeatures(Path(folder).name, pooled, np.array([c for _, c in data.images]),
                                     cached_texts(cache, model, [ZERO_SHOT_TEMPLATE.format(c) for c in data.classes])))
    return HeadData(train_pooled, train_text, np.array([r for r, _ in texts]), dev_pooled, dev_text,
                    np.array([r for r, _ in dev_caps]), class_text, sets)


def run(job: HeadsJob, progress=None, on_epoch=None) -> dict:
    if not job.class_sets:
        log.warning("no --classes sets: choosing the epoch on Flickr8k dev alone")
    for folder in job.class_sets:
        if not Path(folder).is_dir():
            raise DatasetError(f"{folder}: not a folder of class folders")
    t0 = time.time()
    torch.manual_seed(job.options.seed)
    model = build_model(job)
    data = gather(job, model, progress)
    result = fit_heads(model, data, job.options, on_epoch)
    best = result["history"][result["best_epoch"]]
    config = {
        "name": Path(job.out_dir).name, "views": list(EVAL_VIEWS), "fusion_weight": 0.0,
        "description": (f"{job.image_tower} and all-MiniLM-L6-v2 as pretrained (locked); heads trained on "
                        f"{len(data.train_owner)} captions of {len(data.train_pooled)} train images"
                        + ("; ImageNet classifier channel" if job.imagenet_channel else "")),
        "heads_training": {
            "dataset": str(job.dataset), "extra_captions": [str(p) for p in job.extra_captions],
            "class_sets": [str(p) for p in job.class_sets], "train_views": list(TRAIN_VIEWS),
            "random_views": job.random_views, "captions": int(len(data.train_owner)),
            "best_epoch": result["best_epoch"], "dev": best, "history": result["history"],
            "options": result["options"], "seconds": round(time.time() - t0, 1),
            "class_temperature": float(model.class_log_temp.detach().exp()) if job.imagenet_channel else None,
            "class_gain": float(model.class_gain.detach()) if job.imagenet_channel else None,
        },
    }
    checkpoint.save_checkpoint(job.out_dir, config, dual=model)
    return config["heads_training"]
