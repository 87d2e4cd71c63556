"""Upgrading an index in place to a new release of its model (`xmr upgrade`).

Fills an index's store with N synthetic image rows and M captions, marks it as
built by an earlier release with the same image side, and times
``Engine.upgrade``: every image's query-bank bias computed again from its
stored vector, every caption embedded again by the real model, then both
FAISS indexes rebuilt. Compare with a rebuild, which decodes and embeds every
image again (``bench_index.py``: about 70 images/s on the 2-core CPU).

    python benchmarks/bench_upgrade.py --images N --captions M [--model xmr-lite2] [--json]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from report import emit, peak_rss_mb

WORDS = ("a man woman dog child two black white red blue people girl boy wearing shirt running on the in of "
         "with at water grass street beach ball playing sitting standing near snow field").split()


@click.command()
@click.option("--images", "n_images", type=int, default=100_000, show_default=True)
@click.option("--captions", "n_captions", type=int, default=10_000, show_default=True)
@click.option("--model", default="xmr-lite2", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n_images, n_captions, model, as_json):
    import numpy as np

    from indexer.store import Store
    from retrieval.encoders import create_encoder
    from retrieval.engine import DB_NAME, Engine

    rng = np.random.default_rng(0)
    enc = create_encoder(model)
    with tempfile.TemporaryDirectory(prefix="xmr-bench-") as tmp:
        store = Store(Path(tmp) / DB_NAME)
        t = time.perf_counter()
        for s in range(0, n_images, 20_000):
            m = min(20_000, n_images - s)
            x = rng.normal(size=(m, enc.dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.write_images([dict(path=f"/bench/{s + k}.jpg", size=1, mtime_ns=1, sha256=f"{s + k:064x}",
                                     width=1, height=1, embedding=v, bias=0.0) for k, v in enumerate(x)],
                               [], [], [])
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(n_captions)]
        for s in range(0, n_captions, 20_000):
            part = texts[s : s + 20_000]
            store.add_captions([(None, c) for c in part], np.zeros((len(part), enc.dim), np.float32), "bench",
                               np.zeros(len(part), np.float32))
        store.set_meta(model=enc.name, model_version="earlier", image_side=enc.image_side(), dim=enc.dim)
        fill_s = time.perf_counter() - t
        store.close()
        t = time.perf_counter()
        engine = Engine.open(tmp, reranker="none", encoder=enc, upgrade=True)
        out = engine.upgrade()
        seconds = time.perf_counter() - t
        assert out["upgraded"] and out["images"] == n_images and out["captions"] == n_captions, out
        index_type = engine._index("images").spec.factory
        engine.close()
    rss = peak_rss_mb()
    emit({"images": n_images, "captions": n_captions, "model": enc.name, "store_fill_s": round(fill_s, 1),
          "upgrade_s": round(seconds, 1), "items_per_s": round((n_images + n_captions) / seconds, 1),
          "index_type": index_type, "peak_rss_mb": round(rss)}, as_json)


if __name__ == "__main__":
    main()
