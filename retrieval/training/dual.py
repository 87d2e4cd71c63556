"""Training the dual encoder: symmetric InfoNCE over in-batch pairs, with
captions of the same image never counted as negatives of each other."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import retrieval_report
from .data import SplitData

log = logging.getLogger(__name__)


@dataclass
class DualTrainOptions:
    epochs: int = 15
    batch_size: int = 256
    lr_image: float = 2e-4
    lr_text: float = 2e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    train_image_tower: bool = True
    crop_scale_min: float = 0.6
    seed: int = 0


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, img_ids: torch.Tensor):
    """Symmetric InfoNCE on normalised embeddings; duplicates of an image in the
    batch are masked out instead of being treated as negatives."""
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()
    same = img_ids[:, None] == img_ids[None, :]
    eye = torch.eye(len(img_ids), dtype=torch.bool, device=img.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(img_ids), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def random_resized_crop(pixels: torch.Tensor, scale_min: float, generator: torch.Generator) -> torch.Tensor:
    """Random crop of area in [scale_min, 1] and aspect in [3/4, 4/3], resized
    back to the input size, all on the tensor's device. ``[B,3,S,S]`` float."""
    b = pixels.shape[0]
    dev = pixels.device
    area = torch.empty(b).uniform_(scale_min, 1.0, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw, tx
    theta[:, 1, 1], theta[:, 1, 2] = sh, ty
    grid = F.affine_grid(theta.to(dev, pixels.dtype), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def encode_split(model, data: SplitData, device: torch.device, batch: int = 256, with_regions: bool = False):
    """Normalised embeddings of a split's images and captions (eval mode).

    With ``with_regions`` also returns the raw region levels (fp16, on ``device``)
    and the word states (fp16) for reranker training.
    """
    model.eval()
    img, txt, level_parts, words = [], [], [], []
    for s in range(0, data.n_images, batch):
        px = model.normalize_pixels(data.pixels[s : s + batch].to(device))
        with _autocast(device):
            emb, lv = model.image_forward(px.contiguous(memory_format=torch.channels_last), with_regions)
        img.append(F.normalize(emb.float(), dim=-1))
        if with_regions:
            level_parts.append([x.half() for x in lv])
    levels = [torch.cat(parts) for parts in zip(*level_parts)] if with_regions else None
    for s in range(0, data.n_texts, batch):
        ids = data.input_ids[s : s + batch].to(device)
        mask = data.attention_mask[s : s + batch].to(device)
        with _autocast(device):
            emb, hidden = model.text_forward(ids, mask)
        txt.append(F.normalize(emb.float(), dim=-1))
        if with_regions:
            words.append(hidden.half())
    out = (torch.cat(img), torch.cat(txt))
    if with_regions:
        return out + (levels, torch.cat(words))
    return out


def evaluate_dual(model, data: SplitData, device) -> dict:
    img, txt = encode_split(model, data, device)
    sim = (img @ txt.t()).float().cpu().numpy()
    return retrieval_report(sim, data.text_image.cpu().numpy())


def train_dual(model, train: SplitData, dev: SplitData, opts: DualTrainOptions, device, progress=None) -> dict:
    """Train in place; restores the epoch with the best dev rsum. Returns its history."""
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    model.set_trainable(opts.train_image_tower, model.config.text_trainable_layers)
    model.to(device)
    if device.type == "cuda":
        model.image_tower.to(memory_format=torch.channels_last)
    groups = [
        {"params": [p for p in model.image_tower.parameters() if p.requires_grad], "lr": opts.lr_image},
        {"params": [p for p in model.text_tower.parameters() if p.requires_grad], "lr": opts.lr_text},
        {"params": list(model.image_head.parameters()) + list(model.text_head.parameters()), "lr": opts.lr_head},
        {"params": [model.logit_scale], "lr": opts.lr_head, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optim = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    steps_per_epoch = max(1, train.n_texts // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    base_lrs = [g["lr"] for g in optim.param_groups]

    def set_lr(step):
        if step < opts.warmup_steps:
            f = (step + 1) / opts.warmup_steps
        else:
            f = 0.5 * (1 + math.cos(math.pi * (step - opts.warmup_steps) / max(1, total - opts.warmup_steps)))
        for g, lr in zip(optim.param_groups, base_lrs):
            g["lr"] = lr * f

    history, best, best_state = [], -1.0, None
    step = 0
    for epoch in range(opts.epochs):
        model.train()
        if not opts.train_image_tower:
            model.image_tower.eval()
        perm = torch.randperm(train.n_texts, generator=gen)
        t0, losses = time.time(), []
        for b in range(steps_per_epoch):
            caps = perm[b * opts.batch_size : (b + 1) * opts.batch_size]
            img_ids = train.text_image[caps]
            px = model.normalize_pixels(train.pixels[img_ids].to(device, non_blocking=True))
            px = random_resized_crop(px, opts.crop_scale_min, gen)
            if device.type == "cuda":
                px = px.contiguous(memory_format=torch.channels_last)
            set_lr(step)
            with _autocast(device):
                img_emb, _ = model.image_forward(px)
                txt_emb, _ = model.text_forward(train.input_ids[caps].to(device), train.attention_mask[caps].to(device))
            loss = contrastive_loss(
                F.normalize(img_emb.float(), dim=-1), F.normalize(txt_emb.float(), dim=-1),
                model.logit_scale, img_ids.to(device),
            )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optim.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(epoch, b, steps_per_epoch, losses[-1])
        report = evaluate_dual(model, dev, device)
        entry = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "dev": report, "seconds": time.time() - t0}
        history.append(entry)
        log.info("dual epoch %d loss %.4f dev rsum %.1f (%.0fs)", epoch + 1, entry["loss"], report["rsum"], entry["seconds"])
        if report["rsum"] > best:
            best = report["rsum"]
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_dev_rsum": best}
