"""One-shot `xmr search` cost: what a user waits for at the shell.

Each run is a fresh Python process (the real CLI), so imports and model
loading are counted. A second set of runs measures the parts in-process:
importing torch, opening the engine (model and index), the first query and a
later one. The index is the 32 photos of flickr8k-mini unless --index names one.

    python benchmarks/bench_startup.py [--index DIR] [--runs 5] [--no-rerank] [--json]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "datasets" / "flickr8k-mini" / "Flicker8k_Dataset"

PARTS = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from retrieval.engine import Engine
eng = Engine.open(sys.argv[1], reranker=sys.argv[2])
t2 = time.perf_counter()
eng.search("a dog runs on the beach", k=10, rerank=sys.argv[2] != "none")
t3 = time.perf_counter()
eng.search("two children play in the snow", k=10, rerank=sys.argv[2] != "none")
t4 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "open_engine_s": t2 - t1, "first_query_s": t3 - t2,
                  "later_query_s": t4 - t3,
                  "transformers_imported": any(m.split(".")[0] == "transformers" for m in sys.modules)}))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise click.ClickException(f"{' '.join(args[:4])} ... failed:\n{out.stderr[-2000:]}")
    return out


@click.command()
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="An existing index (default: a temporary one of flickr8k-mini).")
@click.option("--runs", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--no-rerank", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def main(index_dir, runs, no_rerank, as_json):
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        if index_dir is None:
            if not MINI.is_dir():
                raise click.ClickException(f"{MINI} not found; pass --index")
            index_dir = str(Path(tmp) / "index")
            _run([py, "-m", "retrieval.cli", "--index", index_dir, "index", str(MINI)])
        search = [py, "-m", "retrieval.cli", "--index", index_dir, "search", "a dog runs on the beach"]
        if no_rerank:
            search.append("--no-rerank")
        walls, parts = [], []
        for _ in range(runs):
            t = time.perf_counter()
            _run(search)
            walls.append(time.perf_counter() - t)
            parts.append(json.loads(_run([py, "-c", PARTS, index_dir, "none" if no_rerank else "auto"])
                                    .stdout.strip().splitlines()[-1]))
    out = {"runs": runs, "rerank": not no_rerank, "cli_search_s_p50": round(statistics.median(walls), 3),
           "cli_search_s_all": [round(w, 3) for w in walls]}
    for key in ("import_torch_s", "open_engine_s", "first_query_s", "later_query_s"):
        out[key + "_p50"] = round(statistics.median(p[key] for p in parts), 3)
    out["transformers_imported"] = any(p["transformers_imported"] for p in parts)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{'one-shot `xmr search` (whole process), p50':<46}{out['cli_search_s_p50']:>8.2f} s")
    for key, label in (("import_torch_s", "import torch"), ("open_engine_s", "open the engine (model + index)"),
                       ("first_query_s", "first query"), ("later_query_s", "a later query")):
        click.echo(f"{label:<46}{out[key + '_p50']:>8.3f} s")
    click.echo(f"transformers imported: {out['transformers_imported']}")


if __name__ == "__main__":
    main()
