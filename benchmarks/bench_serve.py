"""Throughput of `xmr serve` under concurrent clients: the server as shipped
(searches in parallel) against the same server with every engine call behind
one lock (how it served before), side by side in one run.

Both servers are the real app under uvicorn on 127.0.0.1, each in a process of
its own (as `xmr serve` runs), over the real model
(reranking on) and an index of the flickr8k-mini photos unless --index names
one. Clients are threads sending GET /api/search with Flickr8k captions.

    python benchmarks/bench_serve.py [--index DIR] [--requests 200] [--clients 16] [--json]

prints {"serial_rps", "parallel_rps", "ratio", "errors", "p95_ms", ...}.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT.parent / "shared" / "datasets" / "flickr8k-mini"


class Serialised:
    """An engine whose every call waits for one lock: the server's behaviour
    before searches ran in parallel."""

    def __init__(self, engine):
        self._engine = engine
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


SERVER = r"""
import socket, sys
sys.path.insert(0, sys.argv[4])
from retrieval.threads import share_cpu
share_cpu()  # as the CLI does
import torch, uvicorn
from benchmarks.bench_serve import Serialised
from retrieval.engine import Engine
from retrieval.server import create_app
index, mode, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
engine = Engine.open(index, create=False)
engine.search("warm up", k=10)
sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
app = create_app(Serialised(engine) if mode == "serial" else engine)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def _serve(index_dir, mode: str, threads: int):
    """A server process (the real app under uvicorn) and its port."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(index_dir), mode, str(threads), str(ROOT)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    port = int(proc.stdout.readline())
    for _ in range(600):  # until it answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, port


def _load(port: int, queries: list[str], clients: int) -> dict:
    """Send every query once from ``clients`` threads; wall time, latencies, errors."""
    latencies, errors = [], []
    todo = list(enumerate(queries))
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not todo:
                    break
                _, q = todo.pop()
            t = time.perf_counter()
            try:
                conn.request("GET", "/api/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or not json.loads(body):
                    errors.append(f"{resp.status}: {body[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            latencies.append(time.perf_counter() - t)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"rps": len(queries) / wall, "p50_ms": 1000 * float(np.median(latencies)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95)), "errors": errors}


@click.command()
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="An existing index (default: flickr8k-mini indexed into a temporary folder).")
@click.option("--requests", "n_requests", type=int, default=200, show_default=True)
@click.option("--clients", type=int, default=16, show_default=True)
@click.option("--threads", "serve_threads", type=int, default=0, show_default=True,
              help="torch threads of the parallel server (0: as `xmr serve` sets them).")
@click.option("--json", "as_json", is_flag=True)
def main(index_dir, n_requests, clients, serve_threads, as_json):
    from retrieval.engine import Engine

    tmp = None
    if index_dir is None:
        tmp = tempfile.TemporaryDirectory()
        index_dir = Path(tmp.name) / "index"
        Engine.open(index_dir).index([MINI / "Flicker8k_Dataset"])
    captions = [line.split("\t", 1)[1].strip()
                for line in (MINI / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines() if "\t" in line]
    queries = [captions[i % len(captions)] for i in range(n_requests)]
    result = {}
    # before: engine calls behind one lock, torch's threads as they come; now: in parallel, --threads each
    for kind, threads in (("serial", 0), ("parallel", serve_threads)):
        proc, port = _serve(index_dir, kind, threads)
        try:
            _load(port, queries[:32], clients)  # warm the server's threads
            result[kind] = _load(port, queries, clients)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    errors = result["serial"]["errors"] + result["parallel"]["errors"]
    out = {
        "serial_rps": round(result["serial"]["rps"], 2),
        "parallel_rps": round(result["parallel"]["rps"], 2),
        "ratio": round(result["parallel"]["rps"] / result["serial"]["rps"], 2),
        "errors": len(errors),
        "p95_ms": round(result["parallel"]["p95_ms"], 1),
        "p50_ms": round(result["parallel"]["p50_ms"], 1),
        "serial_p95_ms": round(result["serial"]["p95_ms"], 1),
        "requests": n_requests, "clients": clients, "threads": serve_threads,
    }
    if errors:
        click.echo(f"first error: {errors[0]}", err=True)
    emit(out, as_json)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
