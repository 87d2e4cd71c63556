"""Text -> image query latency over N indexed vectors.

Synthetic, clustered unit vectors stand in for the collection (for size); the
real model encodes the queries (for their cost), the search vectors are drawn
from the collection's distribution, and the reranker scores the top K from
region tokens of the stored shape. When the model has a query bank, the vectors
carry a (synthetic) bias column as in the engine, and queries are augmented.

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
@click.option("--no-querybank", is_flag=True, help="plain cosine vectors even if the model has a query bank")
@click.option("--bias-std", type=float, default=0.031, show_default=True,
              help="spread of the synthetic biases (0.031: xmr-lite2 on Flickr8k test images; 0: unscaled)")
@click.option("--json", "as_json", is_flag=True)
def main(n, device, rerank_k, n_queries, no_querybank, bias_std, as_json):
    import numpy as np
    import torch

    from indexer.vectors import build_index
    from reranker.base import ImageCandidate
    from retrieval.encoders import create_encoder
    from retrieval.encoders.querybank import augment_items, augment_queries
    from retrieval.engine import RESCORE_FACTOR, _own_reranker

    enc = create_encoder("xmr-lite2", device=device)
    d = enc.dim
    banked = enc.querybank is not None and not no_querybank
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(16, n // 200), d)).astype(np.float32)

    def sample(g, m):
        x = centers[g.integers(len(centers), size=m)] + 0.6 * g.normal(size=(m, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # A bias is a smooth function of where an item sits (its similarity to a
    # bank of queries), so the synthetic one comes from a synthetic bank drawn
    # from the same distribution, with the shipped model's beta and alpha,
    # rescaled to the spread measured on real images (--bias-std; these
    # synthetic clusters alone would give 0.10, three times the real spread).
    # (a copy without the text memory: the synthetic bank has no caption owners;
    # queries still go through the real model's memory)
    bank = enc.querybank.with_memory(None) if banked else None
    if banked:
        bank.texts = sample(np.random.default_rng(2), 2048)
        probe = bank.image_bias(sample(np.random.default_rng(4), 20_000))
        shift, scale = float(probe.mean()), (bias_std / float(probe.std()) if bias_std > 0 else 1.0)

    def batches():
        g = np.random.default_rng(1)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x = sample(g, m)
            if banked:
                x = augment_items(x, (bank.image_bias(x) - shift) * scale)
            yield np.arange(s, s + m, dtype=np.int64), x

    def query_vectors(q):
        return augment_queries(q, corrected=True) if banked else q

    t_build = time.perf_counter()
    dim = d + 1 if banked else d
    index = build_index(dim, batches, n, use_gpu=(device == "cuda"))
    build_s = time.perf_counter() - t_build
    exact = index if index.spec.factory == "IDMap2,Flat" else \
        build_index(dim, batches, n, exact_limit=n, use_gpu=(device == "cuda"))
    rr = _own_reranker(enc) if rerank_k else None
    shape = enc.token_shape
    queries = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(n_queries)]
    enc.encode_texts(queries[:2])
    # The real model encodes each query (its cost is measured), but the search
    # uses a vector from the collection's own distribution: a real query
    # embedding points nowhere in particular among synthetic vectors, so only
    # the bias would decide its ranking, which no real query resembles.
    search_vecs = sample(np.random.default_rng(3), n_queries)
    for idx in {id(index): index, id(exact): exact}.values():  # on a GPU, the first search makes the GPU copy
        idx.search(query_vectors(search_vecs[:1]), 10)
    times, hits = [], []
    for q, sv in zip(queries, search_vecs):
        t = time.perf_counter()
        enc.encode_texts([q])
        qv = sv[None]
        want_n = max(10, rerank_k)
        if index.exact_scores:
            _, ids = index.search(query_vectors(qv), want_n)
        else:  # as the engine does: more candidates from the 8-bit codes, re-scored from float vectors
            _, cand = index.search(query_vectors(qv), want_n * RESCORE_FACTOR)
            cand = cand[0][cand[0] >= 0]
            exact_scores = exact.index.reconstruct_batch(cand) @ query_vectors(qv)[0]
            ids = cand[np.argsort(-exact_scores, kind="stable")[:want_n]][None]
        if rr is not None:
            cands = [ImageCandidate(int(i), rng.normal(size=d).astype(np.float32),
                                    rng.normal(size=shape).astype(np.float16)) for i in ids[0][:rerank_k]]
            rr.score_text_images(q, qv[0], cands)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
        _, want = exact.search(query_vectors(qv), 10)
        hits.append(len(set(ids[0][:10].tolist()) & set(want[0].tolist())) / 10)
    times.sort()
    out = {
        "vectors": n, "p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
        "rerank_k": rerank_k, "recall_at_10_vs_exact": round(float(np.mean(hits)), 4),
        "index_type": index.spec.factory, "params": index.spec.params, "build_s": round(build_s, 1),
        "rescored_from": None if index.exact_scores else f"top {RESCORE_FACTOR} x",
        "device": device, "torch_threads": torch.get_num_threads(), "querybank": banked,
        "bias_std": bias_std if banked else None,
    }
    emit(out, as_json)


if __name__ == "__main__":
    main()
