"""The standard 1K-test protocol run through the real engine: index the
split's images into a temporary index, import their captions, query both ways."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .datasets import load_dataset, split_records
from .engine import Engine
from .metrics import recalls

MISS = 10**9


def evaluate(dataset, images=None, split: str = "test", model: str | None = None, rerank: bool = True,
             rerank_k: int = 20, limit: int | None = None, progress=None, k: int = 10) -> dict:
    """Recall both ways on ``split`` (reranking the top ``rerank_k`` when ``rerank``)."""
    return evaluate_settings(dataset, images, split, model, (rerank_k if rerank else 0,), limit, progress, k)[0]


def evaluate_settings(dataset, images=None, split: str = "test", model: str | None = None, rerank_ks=(0,),
                      limit: int | None = None, progress=None, k: int = 10, keep_ranks: bool = False) -> list[dict]:
    """One result per entry of ``rerank_ks`` (0: the dual encoder alone),
    all from one temporary index. With ``keep_ranks`` each result also holds
    ``ranks``: (image -> caption, caption -> image) 0-based ranks as arrays,
    and ``text_image``: the image of each caption, for paired comparisons
    (``metrics.bootstrap_rsum_delta``)."""
    t0 = time.time()
    records = split_records(load_dataset(dataset, images), split)
    if limit:
        records = records[:limit]
    paths = [os.path.abspath(r.path) for r in records]
    results = []
    with tempfile.TemporaryDirectory(prefix="xmr-eval-") as tmp:
        engine = temporary_engine(tmp, model, rerank_ks)
        try:
            summary = index_with_bar(engine, paths, f"indexing {split}", progress)
            if summary.skipped:
                raise RuntimeError(f"{sum(summary.skipped.values())} dataset images could not be indexed: "
                                   f"{dict(summary.skipped)}")
            cap_file = Path(tmp) / "captions.csv"
            with open(cap_file, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for r in records:
                    for c in r.captions:
                        w.writerow([r.filename, c])
            engine.import_captions(cap_file, "csv")
            index_seconds = time.time() - t0
            for rerank_k in rerank_ks:
                t1 = time.time()
                use_rr = rerank_k > 0 and engine.reranker is not None
                i2t, t2i = _ranks(engine, records, paths, use_rr, rerank_k, k, progress)
                i2t_r, t2i_r = recalls(np.array(i2t)), recalls(np.array(t2i))
                results.append({
                    "i2t": i2t_r, "t2i": t2i_r, "rsum": sum(i2t_r.values()) + sum(t2i_r.values()),
                    "rerank_k": rerank_k if use_rr else 0, "images": len(records), "captions": len(t2i),
                    "model": engine.encoder.name, "seconds": index_seconds + time.time() - t1,
                    "query_seconds": time.time() - t1,
                })
                if keep_ranks:
                    results[-1]["ranks"] = (np.array(i2t), np.array(t2i))
                    results[-1]["text_image"] = np.array([i for i, r in enumerate(records) for _ in r.captions])
        finally:
            engine.close()
    return results


def temporary_engine(folder: str, model: str | None, rerank_ks) -> Engine:
    """A new index in ``folder``, with the model's reranker where some setting
    reranks; its rows in SQLite there, whatever XMR_DATABASE names (a
    scratch index must not leave a schema behind on a server)."""
    wants_rr = any(k > 0 for k in rerank_ks)
    return Engine.open(Path(folder) / "index", model=model, create=True, reranker="auto" if wants_rr else "none",
                       database="")


def with_bar(progress, desc: str, total: int, work):
    """``work(update)`` behind a progress bar from ``progress(desc, total)``
    (``update`` is None without one); the bar is closed however it ends."""
    bar = progress(desc, total) if progress else None
    try:
        return work(bar.update if bar else None)
    finally:
        if bar:
            bar.close()


def index_with_bar(engine: Engine, paths: list[str], desc: str, progress=None):
    """``engine.index(paths)`` behind a progress bar from ``progress(desc, total)``."""
    return with_bar(progress, desc, len(paths), lambda update: engine.index(paths, progress=update))


def _ranks(engine: Engine, records, paths, rerank: bool, rerank_k: int, k: int, progress):
    """0-based rank of the first right answer of every query (``MISS`` beyond ``k``)."""
    n_queries = len(records) + sum(len(r.captions) for r in records)
    bar = progress("querying", n_queries) if progress else None
    try:
        i2t = []
        for r, path in zip(records, paths):
            hits = engine.caption(path, k=k, rerank=rerank, rerank_k=rerank_k)
            i2t.append(next((h.rank - 1 for h in hits if h.image == r.filename), MISS))
            if bar:
                bar.update(1)
        t2i = []
        for r, path in zip(records, paths):
            for c in r.captions:
                hits = engine.search(c, k=k, rerank=rerank, rerank_k=rerank_k)
                t2i.append(next((h.rank - 1 for h in hits if h.path == path), MISS))
                if bar:
                    bar.update(1)
    finally:
        if bar:
            bar.close()
    return i2t, t2i
