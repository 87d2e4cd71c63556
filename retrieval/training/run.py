"""The training pipeline behind ``xmr train``: dual encoder, then reranker,
then an evaluation report. Trains on the train split only and selects on dev."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..datasets import load_dataset, split_records
from ..encoders import checkpoint
from ..encoders.minilm import MiniLMTokenizer
from ..encoders.xmr_model import IMAGE_TOWERS, XmrDualModel, XmrModelConfig
from ..metrics import retrieval_report
from .data import build_split
from .dual import DualTrainOptions, train_dual
from .rerank import (
    RerankTrainOptions,
    choose_fusion_weight,
    extract_features,
    fused_report,
    rerank_candidates,
    train_reranker,
)
from .retune import RetuneOptions, retune_in_place
from .text_head import HeadOptions, retune_text_head_in_place
from .views import choose_views_in_place

log = logging.getLogger(__name__)

# name -> changes to the reranker config or training options
ABLATIONS = {
    "no_region": ({"use_region_level": False}, {}),
    "no_word": ({"use_word_level": False}, {}),
    "no_global": ({"use_global_level": False}, {}),
    "one_way": ({"two_way": False}, {}),
    "random_neg": ({}, {"hard_negatives": False}),
}
REPORT_KS = (10, 20, 50)
# in the order they run; each later one works on the checkpoint the earlier ones wrote
STAGES = ("dual", "rerank", "int8", "views", "retune", "text_head")


@dataclass
class TrainJob:
    dataset: str
    out_dir: str
    images: str | None = None
    image_tower: str = "efficientnet-lite2"
    image_size: int | None = None
    embed_dim: int = 256
    text_trainable_layers: int = 2
    stages: tuple[str, ...] = STAGES
    resume: str | None = None
    ablations: tuple[str, ...] = ()
    limit: int | None = None
    device: str = "auto"
    eval_test: bool = True
    threads: int = 8
    dual: DualTrainOptions = field(default_factory=DualTrainOptions)
    rerank: RerankTrainOptions = field(default_factory=RerankTrainOptions)
    retune: RetuneOptions = field(default_factory=RetuneOptions)
    text_head: HeadOptions = field(default_factory=HeadOptions)
    reranker_width: int = 256
    reranker_layers: int = 2


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(job: TrainJob, progress_factory=None) -> dict:
    """Run the stages of ``job``; returns (and writes) the report."""
    check_job(job)
    _seed(job.dual.seed)
    device = _device(job.device)
    out = Path(job.out_dir)
    t_start = time.time()

    if job.resume:
        model = checkpoint.load_dual(job.resume)
        log.info("resumed the dual encoder from %s", job.resume)
    else:
        size = job.image_size or IMAGE_TOWERS[job.image_tower][2]
        model = XmrDualModel(XmrModelConfig(job.image_tower, size, job.embed_dim,
                                            text_trainable_layers=job.text_trainable_layers))
    cfg = model.config
    tokenizer = MiniLMTokenizer()

    records = load_dataset(job.dataset, job.images)
    splits = {}
    for name in ("train", "dev") + (("test",) if job.eval_test else ()):
        recs = split_records(records, name)
        if job.limit:
            recs = recs[: job.limit]
        bar = progress_factory(f"decoding {name}", len(recs)) if progress_factory else None
        splits[name] = build_split(recs, cfg.image_size, tokenizer, cfg.text_max_len, job.threads,
                                   bar.update if bar else None)
        if bar:
            bar.close()
        log.info("%s: %d images, %d captions", name, splits[name].n_images, splits[name].n_texts)
    if device.type == "cuda":
        splits = {k: v.to(device) for k, v in splits.items()}

    report: dict = {"job": _job_dict(job), "device": str(device)}
    if torch.cuda.is_available() and device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    model.to(device)

    if "dual" in job.stages:
        steps = job.dual.epochs * max(1, splits["train"].n_texts // job.dual.batch_size)
        bar = progress_factory("dual encoder", steps) if progress_factory else None

        def tick(epoch, b, n, loss):
            if bar:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")

        t0 = time.time()
        dual_result = train_dual(model, splits["train"], splits["dev"], job.dual, device, tick)
        if bar:
            bar.close()
        report["dual_train"] = dual_result
        report["dual_train_seconds"] = time.time() - t0
    model.eval()
    # Dual-encoder metrics of the (possibly resumed) model on every split we hold.
    feats = {name: extract_features(model, data, device) for name, data in splits.items()
             if name != "train" or "rerank" in job.stages}
    for name in ("dev", "test"):
        if name in feats:
            sim = feats[name].sim().float().cpu().numpy()
            report[f"dual_{name}"] = retrieval_report(sim, splits[name].text_image.cpu().numpy())
    checkpoint.save_checkpoint(out, {"dual_dev": report.get("dual_dev"), "dual_test": report.get("dual_test"),
                                     "train_args": report["job"]}, dual=model)
    bank = _fit_querybank(model, splits, feats, device, out, report)

    if "rerank" in job.stages:
        from reranker.model import CrossModalReranker, RerankerConfig

        base_cfg = RerankerConfig(level_dims=list(model.level_dims), word_dim=model.word_dim,
                                  global_dim=cfg.embed_dim, width=job.reranker_width, layers=job.reranker_layers)
        variants = [("full", {}, {})] + [(a,) + ABLATIONS[a] for a in job.ablations]
        report["rerank"] = {}
        for name, cfg_changes, opt_changes in variants:
            _seed(job.rerank.seed)
            rr = CrossModalReranker(dataclasses.replace(base_cfg, **cfg_changes))
            opts = dataclasses.replace(job.rerank, **opt_changes)
            n_steps = opts.epochs * max(1, splits["train"].n_texts // opts.batch_size)
            bar = progress_factory(f"reranker {name}", n_steps) if progress_factory else None

            def tick(epoch, b, n, loss):
                if bar:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")

            t0 = time.time()
            result = train_reranker(rr, feats["train"], feats["dev"], opts, device, tick, bank=bank)
            if bar:
                bar.close()
            weight = result["best"]["fusion_weight"]
            entry = {"train": result, "fusion_weight": weight, "seconds": time.time() - t0,
                     "params": sum(p.numel() for p in rr.parameters())}
            for split in ("dev", "test"):
                if split not in feats:
                    continue
                ti = splits[split].text_image.cpu().numpy()
                entry[split] = {}
                for k in REPORT_KS if name == "full" else (opts.select_k,):
                    cands = rerank_candidates(rr, feats[split], k, bank)
                    entry[split][f"K={k}"] = fused_report(cands, ti, weight)
                    if split == "dev" and k == opts.select_k:
                        entry["dev_best_weight_check"] = choose_fusion_weight(cands, ti)[0]
            report["rerank"][name] = entry
            log.info("reranker %s: dev %s", name, {k: round(v["rsum"], 1) for k, v in entry.get("dev", {}).items()})
            if name == "full":
                checkpoint.save_checkpoint(out, {"fusion_weight": weight, "rerank_k": opts.select_k,
                                                 "rerank_dev": entry.get("dev"), "rerank_test": entry.get("test")},
                                           reranker=rr)
    if "int8" in job.stages:
        report["int8"] = _quantize(out, job)
    # the last three work as the engine does (the checkpoint as written: its views, bank and int8 graph)
    # and decode what they need themselves
    splits = feats = bank = None
    if "views" in job.stages:
        report["views"] = choose_views_in_place(out, job.dataset, job.images, job.limit,
                                                progress_factory=progress_factory)
        log.info("views: %s (dev rsum %.1f)", report["views"]["chosen"], report["views"]["dev_after"]["rsum"])
    if "retune" in job.stages:
        report["retune"] = retune_in_place(out, job.dataset, job.images, job.retune, job.limit, progress_factory)
        log.info("reranker retuned: dev rsum %.1f -> %.1f (epoch %d kept)", report["retune"]["dev_before"]["rsum"],
                 report["retune"]["dev_after"]["rsum"], report["retune"]["best_epoch"])
    if "text_head" in job.stages:
        report["text_head"] = retune_text_head_in_place(out, job.dataset, job.images, job.text_head, job.limit,
                                                        progress_factory)
        log.info("text head retuned: dev rsum %.1f -> %.1f (epoch %d kept)", report["text_head"]["dev_before"]["rsum"],
                 report["text_head"]["dev_after"]["rsum"], report["text_head"]["best_epoch"])
    report["seconds"] = time.time() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_job(job: TrainJob) -> None:
    """Refuse a job that cannot run, before any work (ValueError saying why)."""
    unknown = [a for a in job.ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    unknown = [s for s in job.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if not job.stages:
        raise ValueError(f"no stage to run; choose from {', '.join(STAGES)}")
    if "retune" in job.stages and "rerank" not in job.stages:
        raise ValueError("the retune stage retunes the reranker that the rerank stage trains: add rerank to "
                         "--stages, or retune an existing checkpoint with `xmr retune-reranker`")


def _fit_querybank(model, splits, feats, device, out: Path, report: dict):
    """Build the query bank from the train split, choose beta and alpha on dev,
    save both with the checkpoint; returns the bank (None when it does not help)."""
    from ..encoders.memory import MemorySettings
    from ..encoders.querybank import QueryBank, bank_from_split
    from .calibrate import corrected_scores, score_settings
    from .dual import encode_split

    if "train" in feats:
        img, txt = feats["train"].img_emb, feats["train"].txt_emb
    else:
        img, txt = encode_split(model, splits["train"], device)
    texts, images, owner = bank_from_split(txt.float().cpu().numpy(), img.float().cpu().numpy(),
                                           splits["train"].text_image.cpu().numpy())
    dev = feats["dev"]
    rows = score_settings(QueryBank(texts, images, text_owner=owner), dev.img_emb.float().cpu().numpy(),
                          dev.txt_emb.float().cpu().numpy(), splits["dev"].text_image.cpu().numpy())
    best, none = rows[1], rows[0]
    report["querybank_dev"] = [{"querybank": r["querybank"], "text_memory": r["text_memory"],
                                "rsum": r["report"]["rsum"]} for r in rows]
    if best["report"]["rsum"] <= none["report"]["rsum"]:
        log.info("query bank: no gain on dev; not used")
        return None
    memory = MemorySettings(**best["text_memory"]) if best["text_memory"] else None
    bank = QueryBank(texts, images, **best["querybank"], text_owner=owner, memory=memory)
    bank.save(out)
    meta = {"querybank": best["querybank"], "text_memory": best["text_memory"], "dual_dev_querybank": best["report"]}
    if "test" in feats:
        s_i2t, s_t2i = corrected_scores(bank, feats["test"].img_emb.float().cpu().numpy(),
                                        feats["test"].txt_emb.float().cpu().numpy())
        meta["dual_test_querybank"] = retrieval_report(s_i2t, splits["test"].text_image.cpu().numpy(), sim_t2i=s_t2i)
    checkpoint.save_checkpoint(out, meta)
    report.update(meta)
    log.info("query bank: beta %s alpha %s, text memory %s, dev rsum %.1f -> %.1f", best["querybank"]["beta"],
             best["querybank"]["alpha"], best["text_memory"], none["report"]["rsum"], best["report"]["rsum"])
    return bank


def _quantize(out: Path, job: TrainJob) -> dict | None:
    """The int8 CPU image graph of the checkpoint just written (skipped, with a
    warning, where onnxruntime or onnxscript is missing)."""
    from ..encoders import onnx_runtime
    from .quantize import CALIBRATION_IMAGES, quantize_from_dataset

    if not onnx_runtime.available():
        log.warning("int8 stage skipped: needs onnxruntime and onnxscript")
        return None
    n_calibration, n_check = CALIBRATION_IMAGES, 200
    if job.limit:  # smoke runs stay small
        n_calibration, n_check = min(n_calibration, job.limit), min(n_check, job.limit)
    info = quantize_from_dataset(out, job.dataset, job.images, n_calibration=n_calibration, n_check=n_check)
    log.info("int8 image graph: median cosine to fp32 %.4f (%s)", info["agreement_vs_fp32"]["embedding_median"],
             "kept" if info["kept"] else "not kept")
    return info


def _job_dict(job: TrainJob) -> dict:
    d = dataclasses.asdict(job)
    d["stages"] = list(job.stages)
    d["ablations"] = list(job.ablations)
    return d
