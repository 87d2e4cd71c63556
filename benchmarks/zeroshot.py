"""Zero-shot classification on every set of a folder of labelled sets, plus
Flickr8k dev and test recall, dual encoder alone and reranked, in one table.

    python benchmarks/zeroshot.py [--sets ../shared/datasets/zeroshot] [--flickr8k ../shared/datasets/flickr8k]
                                  [--model NAME] [--rerank-k 20] [--template T ...] [--json]

Every figure comes through the real engine (``xmr eval --classes`` and
``xmr eval --dataset``): a temporary index per set, top-1 accuracy in percent
for the classes (one caption per class, the templates averaged), rsum for
Flickr8k. ``--rerank-k 0`` measures the dual encoder alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from report import peak_rss_mb


def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False)


@click.command()
@click.option("--sets", "sets_dir", default="../shared/datasets/zeroshot", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="A folder of class-folder sets.")
@click.option("--flickr8k", default="../shared/datasets/flickr8k", show_default=True,
              help="Flickr8k folder for dev and test recall ('' to skip).")
@click.option("--splits", default="dev,test", show_default=True, help="Flickr8k splits to measure.")
@click.option("--model", default=None, help="Model to measure (default: the default model).")
@click.option("--rerank-k", type=click.IntRange(0, 1000), default=20, show_default=True,
              help="Also measure reranking the top K (0: dual encoder alone only).")
@click.option("--template", "templates", multiple=True, help="Prompt template(s), {} for the class name.")
@click.option("--only", default="", help="Comma-separated set names to run (default: all).")
@click.option("--json", "as_json", is_flag=True)
def main(sets_dir, flickr8k, splits, model, rerank_k, templates, only, as_json):
    import json

    from retrieval.engine import DEFAULT_TEMPLATES
    from retrieval.evaluation import evaluate_settings
    from retrieval.zeroshot import evaluate_classes

    t0 = time.time()
    ks = (0, rerank_k) if rerank_k else (0,)
    wanted = {s for s in only.split(",") if s}
    progress = None if as_json else _bar
    rows = []
    for folder in sorted(p for p in Path(sets_dir).iterdir() if p.is_dir()):
        if wanted and folder.name not in wanted:
            continue
        for res in evaluate_classes(folder, model=model, templates=templates or DEFAULT_TEMPLATES,
                                    rerank_ks=ks, progress=progress):
            rows.append({"set": folder.name, **res})
    if flickr8k and Path(flickr8k).exists():
        for split in [s for s in splits.split(",") if s]:
            if wanted and f"flickr8k-{split}" not in wanted:
                continue
            for res in evaluate_settings(flickr8k, split=split, model=model, rerank_ks=ks, progress=progress):
                rows.append({"set": f"flickr8k-{split}", **res})
    result = {"model": rows[0]["model"] if rows else model, "rows": rows, "seconds": round(time.time() - t0, 1),
              "peak_rss_mb": round(peak_rss_mb())}
    if as_json:
        click.echo(json.dumps(result))
        return
    _table(rows, ks)
    click.echo(f"({result['model']}, {result['seconds']:.0f} s)")


def _table(rows: list[dict], ks) -> None:
    """Markdown table: one line per set, a column per rerank setting."""
    heads = ["dual" if k == 0 else f"rerank K={k}" for k in ks]
    click.echo("| set | metric | " + " | ".join(heads) + " |")
    click.echo("|---|---|" + "---|" * len(heads))
    by_set: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_set.setdefault(r["set"], {})[r["rerank_k"]] = r
    means = {k: [] for k in ks}
    for name, res in by_set.items():
        zs = "top1" in next(iter(res.values()))
        cells = []
        for k in ks:
            r = res.get(k)
            if r is None:
                cells.append("–")
                continue
            value = r["top1"] if zs else r["rsum"]
            cells.append(f"{value:.1f}")
            if zs:
                means[k].append(value)
        click.echo(f"| {name} | {'top-1' if zs else 'rsum'} | " + " | ".join(cells) + " |")
    if any(means.values()):
        cells = [f"{sum(v) / len(v):.1f}" if v else "–" for v in means.values()]
        click.echo("| zero-shot mean | top-1 | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
