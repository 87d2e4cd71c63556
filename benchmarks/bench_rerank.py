"""CPU (or GPU) cost per query of the reranker variants in RESULTS.md.

For one text query: encode the text (word states), then score K candidate
images from stored region tokens. Weights are random (cost does not depend on
them); shapes are those of the default model.

    python benchmarks/bench_rerank.py [--k 10,20,50] [--device cpu] [--json]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import click


@click.command()
@click.option("--k", "ks", default="10,20,50", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeats", default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(ks, device, repeats, as_json):
    import numpy as np
    import torch

    from reranker.model import CrossModalReranker
    from reranker.xmr import XmrReranker
    from retrieval.encoders import create_encoder

    enc = create_encoder("xmr-lite2", device=device)
    shipped = enc.reranker_model.config
    base = dataclasses.replace(shipped)
    variants = {
        "shipped (w128, 1 layer)": base,
        "w256, 2 layers": dataclasses.replace(base, width=256, layers=2),
        "no region level": dataclasses.replace(base, use_region_level=False),
        "no word level": dataclasses.replace(base, use_word_level=False),
        "one-way attention": dataclasses.replace(base, two_way=False),
    }
    rng = np.random.default_rng(0)
    query = "a black dog is running through the grass"
    qvec = enc.encode_texts([query])[0]
    rows = []
    for name, cfg in variants.items():
        model = CrossModalReranker(cfg).to(device).eval()
        rr = XmrReranker(model, enc.text_states, 20.0)
        n_tok = cfg.level_tokens * len(cfg.level_dims)
        from reranker.base import ImageCandidate

        for k in [int(x) for x in ks.split(",")]:
            cands = [ImageCandidate(i, rng.normal(size=256).astype(np.float32),
                                    rng.normal(size=(n_tok, cfg.width)).astype(np.float16)) for i in range(k)]
            rr.score_text_images(query, qvec, cands)  # warm-up
            times = []
            for i in range(repeats):
                # a new text each time: the encoder keeps the last query's word states
                t = time.perf_counter()
                rr.score_text_images(f"{query} {k} {i}", qvec, cands)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1000)
            rows.append({"variant": name, "k": k, "p50_ms": statistics.median(times),
                         "params": sum(p.numel() for p in model.parameters())})
    if as_json:
        click.echo(json.dumps({"device": device, "threads": torch.get_num_threads(), "rows": rows}))
        return
    click.echo(f"device {device}, torch threads {torch.get_num_threads()}")
    click.echo(f"{'variant':<26}{'K':>5}{'p50 ms':>10}{'params':>12}")
    for r in rows:
        click.echo(f"{r['variant']:<26}{r['k']:>5}{r['p50_ms']:>10.1f}{r['params']:>12,}")


if __name__ == "__main__":
    main()
