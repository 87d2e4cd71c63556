"""Does a model's reranker pay? Its gain over the same model's recall, with
the paired bootstrap interval, through the real engine.

For each model and split: one temporary index of the split's photos and
captions (as `xmr eval` builds it), queried both ways by recall alone and
reranked at each K; per K, the rsum, its difference to recall with the 95%
interval (`retrieval.metrics.bootstrap_rsum_delta`, resampling images), how
often reranking took a right first hit off the top ("worse") or brought one
there ("better"), and the mean query time.

    python benchmarks/rerank_gain.py [--model xmr-lite2 ...] [--split dev --split test] [--k 20] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

FLICKR8K = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "flickr8k"


def gain_rows(model: str, dataset: str, split: str, ks: tuple[int, ...], limit: int | None) -> list[dict]:
    from retrieval.evaluation import evaluate_settings
    from retrieval.metrics import bootstrap_rsum_delta, top1_changes

    results = evaluate_settings(dataset, None, split, model, (0,) + ks, limit, keep_ranks=True)
    base = results[0]
    n_img, n_txt = len(base["ranks"][0]), len(base["ranks"][1])
    text_image = base["text_image"]
    rows = []
    for r in results:
        row = {"model": model, "split": split, "rerank_k": r["rerank_k"], "rsum": round(r["rsum"], 1),
               "ms_per_query": round(1000 * r["query_seconds"] / (n_img + n_txt), 1)}
        if r is not base:
            boot = bootstrap_rsum_delta(base["ranks"], r["ranks"], text_image)
            row.update({"delta": round(boot["delta"], 1), "low": round(boot["low"], 1), "high": round(boot["high"], 1),
                        "top1_i2t": top1_changes(base["ranks"][0], r["ranks"][0]),
                        "top1_t2i": top1_changes(base["ranks"][1], r["ranks"][1])})
        rows.append(row)
    return rows


@click.command()
@click.option("--model", "models", multiple=True, default=("xmr-lite2",), show_default=True)
@click.option("--dataset", default=str(FLICKR8K), show_default=True)
@click.option("--split", "splits", multiple=True, default=("dev",), show_default=True)
@click.option("--k", "ks", multiple=True, type=int, default=(20,), show_default=True, help="rerank depths to measure")
@click.option("--limit", type=int, default=None, help="only the first N photos of each split")
@click.option("--json", "as_json", is_flag=True)
def main(models, dataset, splits, ks, limit, as_json):
    rows = [row for model in models for split in splits for row in gain_rows(model, dataset, split, ks, limit)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | split | K | rsum | delta [95% interval] | top-1 worse / better (i2t; t2i) | ms/query |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]" if "delta" in r else "–"
        t = (f"{r['top1_i2t']['worse']:.1f} / {r['top1_i2t']['better']:.1f}; "
             f"{r['top1_t2i']['worse']:.1f} / {r['top1_t2i']['better']:.1f}") if "delta" in r else "–"
        print(f"| {r['model']} | {r['split']} | {r['rerank_k']} | {r['rsum']:.1f} | {d} | {t} | {r['ms_per_query']} |")


if __name__ == "__main__":
    main()
