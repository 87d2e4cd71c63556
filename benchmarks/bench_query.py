"""Text -> image query latency over N indexed vectors.

Synthetic, clustered unit vectors stand in for the collection (for size); the
real model encodes the queries and its reranker scores the top K from region
tokens of the stored shape.

    python benchmarks/bench_query.py --vectors N [--device cpu|cuda] [--rerank-k K] [--json]
"""

from __future__ import annotations

import statistics
import time

import click
from report import emit

QUERIES = [
    "a dog running on the beach", "two children playing in a fountain", "a man riding a bike on a dirt road",
    "a woman in a red coat walking in the snow", "people sitting at a table in a restaurant",
    "a black and white dog jumping over a fence", "a boy swimming in a pool", "a crowd watching a concert",
    "a climber on a rock face", "a girl with a kite in a field",
]


@click.command()
@click.option("--vectors", "n", type=int, required=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--rerank-k", type=int, default=0, show_default=True)
@click.option("--queries", "n_queries", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n, device, rerank_k, n_queries, as_json):
    import numpy as np
    import torch

    from indexer.vectors import build_index
    from reranker.base import ImageCandidate
    from retrieval.encoders import create_encoder
    from retrieval.engine import _own_reranker

    enc = create_encoder("xmr-lite2", device=device)
    d = enc.dim
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(16, n // 200), d)).astype(np.float32)

    def batches():
        g = np.random.default_rng(1)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x = centers[g.integers(len(centers), size=m)] + 0.6 * g.normal(size=(m, d)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield np.arange(s, s + m, dtype=np.int64), x

    t_build = time.perf_counter()
    index = build_index(d, batches, n, use_gpu=(device == "cuda"))
    build_s = time.perf_counter() - t_build
    exact = build_index(d, batches, n, exact_limit=n, use_gpu=(device == "cuda")) if index.spec.factory != "IDMap2,Flat" else index
    rr = _own_reranker(enc) if rerank_k else None
    shape = enc.token_shape
    queries = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(n_queries)]
    enc.encode_texts(queries[:2])
    times, hits = [], []
    for q in queries:
        t = time.perf_counter()
        qv = enc.encode_texts([q])
        _, ids = index.search(qv, max(10, rerank_k))
        if rr is not None:
            cands = [ImageCandidate(int(i), rng.normal(size=d).astype(np.float32),
                                    rng.normal(size=shape).astype(np.float16)) for i in ids[0][:rerank_k]]
            rr.score_text_images(q, qv[0], cands)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
        _, want = exact.search(qv, 10)
        hits.append(len(set(ids[0][:10].tolist()) & set(want[0].tolist())) / 10)
    times.sort()
    out = {
        "vectors": n, "p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
        "rerank_k": rerank_k, "recall_at_10_vs_exact": round(float(np.mean(hits)), 4),
        "index_type": index.spec.factory, "params": index.spec.params, "build_s": round(build_s, 1),
        "device": device, "torch_threads": torch.get_num_threads(),
    }
    emit(out, as_json)


if __name__ == "__main__":
    main()
