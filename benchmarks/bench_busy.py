"""A reranked query while other processes keep every core busy, against the
same query on an idle machine: how gracefully xmr shares a CPU.

The index is flickr8k-mini with its 160 captions imported; the query is
`caption` of an indexed photo and `search` of a caption, reranker on. Each
setting runs in a fresh process (thread settings are read when torch loads):
``--omp-wait`` chooses OMP_WAIT_POLICY for it (``default``: what xmr sets,
retrieval/threads.py).

    python benchmarks/bench_busy.py [--queries 30] [--busy N] [--load torch|python]
                                    [--omp-wait default|active|passive] [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "datasets" / "flickr8k-mini"

TIMER = r"""
import json, statistics, sys, time
from retrieval.threads import share_cpu
share_cpu()
from retrieval.engine import Engine
eng = Engine.open(sys.argv[1], create=False)
photos = sorted(p for p in __import__("pathlib").Path(sys.argv[2]).iterdir())
n = int(sys.argv[3])
eng.caption(photos[0], k=5); eng.search("a dog", k=10)
out = {}
for kind in ("caption", "search"):
    times = []
    for i in range(n):
        t = time.perf_counter()
        if kind == "caption":
            eng.caption(photos[i % len(photos)], k=5)
        else:
            eng.search(f"a dog runs on the grass {i}", k=10)
        times.append(time.perf_counter() - t)
    out[kind + "_ms"] = 1000 * statistics.median(times)
print(json.dumps(out))
"""


BUSY = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    a = torch.tanh(a @ a)
"""


def _busy(kind: str, cores: int, seconds: float) -> list[subprocess.Popen]:
    """Processes keeping ``cores`` cores busy: plain Python loops (``python``),
    or one PyTorch process with that many threads (``torch``: another model
    at work, xmr index say)."""
    if kind == "torch":
        return [subprocess.Popen([sys.executable, "-c", BUSY, str(cores), str(seconds)])]
    loop = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(cores)]


def _time(index_dir: Path, n: int, omp_wait: str) -> dict:
    env = dict(os.environ)
    if omp_wait != "default":
        env["OMP_WAIT_POLICY"] = omp_wait.upper()
    out = subprocess.run([sys.executable, "-c", TIMER, str(index_dir), str(MINI / "Flicker8k_Dataset"), str(n)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise click.ClickException(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--queries", type=int, default=30, show_default=True)
@click.option("--busy", type=int, default=None, help="Cores kept busy (default: all).")
@click.option("--load", type=click.Choice(["python", "torch"]), default="torch", show_default=True,
              help="What keeps them busy: Python loops, or a PyTorch process with a thread per core.")
@click.option("--omp-wait", type=click.Choice(["default", "active", "passive"]), default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(queries, busy, load, omp_wait, as_json):
    from retrieval.engine import Engine

    busy = busy or os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        eng = Engine.open(index_dir)
        eng.index([MINI / "Flicker8k_Dataset"])
        eng.import_captions(MINI / "Flickr8k_text" / "Flickr8k.token.txt")
        eng.close()
        idle = _time(index_dir, queries, omp_wait)
        procs = _busy(load, busy, 600)
        try:
            time.sleep(1.0)
            loaded = _time(index_dir, queries, omp_wait)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    out = {"omp_wait": omp_wait, "load": load, "busy_cores": busy}
    for kind in ("caption", "search"):
        out[f"{kind}_idle_ms"] = round(idle[f"{kind}_ms"], 1)
        out[f"{kind}_busy_ms"] = round(loaded[f"{kind}_ms"], 1)
        out[f"{kind}_ratio"] = round(loaded[f"{kind}_ms"] / idle[f"{kind}_ms"], 2)
    emit(out, as_json)


if __name__ == "__main__":
    main()
