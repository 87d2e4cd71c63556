"""Keeping the FAISS index current as a collection changes.

Fills an index's store with N synthetic image rows, lets the engine build its
FAISS index, then adds ``--add`` new rows and removes as many, and times how
the engine brings the index up to date (journal replay), how long another
process takes to open it afterwards (load the file, replay the journal), and
a full rebuild from the store. No model runs: a stand-in encoder gives the
dimension.

    python benchmarks/bench_update.py --vectors N [--add 100] [--json]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from report import emit


class _Dimension:
    """The part of an encoder the index maintenance needs."""

    name = "bench"
    version = "1"
    input_size = 224
    querybank = None

    def __init__(self, dim: int):
        self.dim = dim


def _rows(vectors, start: int):
    return [dict(path=f"/bench/{start + n}.jpg", size=1, mtime_ns=1, sha256=f"{start + n:064x}", width=1, height=1,
                 embedding=v) for n, v in enumerate(vectors)]


@click.command()
@click.option("--vectors", "n", type=int, required=True)
@click.option("--add", "n_add", type=int, default=100, show_default=True)
@click.option("--dim", type=int, default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n, n_add, dim, as_json):
    import numpy as np

    from indexer.store import Store
    from retrieval.engine import DB_NAME, Engine

    rng = np.random.default_rng(0)

    def unit(m):
        x = rng.normal(size=(m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory(prefix="xmr-bench-") as tmp:
        store = Store(Path(tmp) / DB_NAME)
        t = time.perf_counter()
        for s in range(0, n, 20_000):
            store.write_images(_rows(unit(min(20_000, n - s)), s), [], [], [])
        fill_s = time.perf_counter() - t
        engine = Engine(Path(tmp), store, _Dimension(dim))
        t = time.perf_counter()
        index = engine._index("images")
        build_s = time.perf_counter() - t
        store.write_images(_rows(unit(n_add), n), [], [], [])
        store.write_images([], [], [], list(range(1, n_add + 1)))  # the first rows leave
        t = time.perf_counter()
        updated = engine._index("images")
        update_s = time.perf_counter() - t
        assert updated.ntotal == n, updated.ntotal
        engine._indexes.clear()  # another process opening the index: load the file, replay the journal
        t = time.perf_counter()
        assert engine._index("images").ntotal == n
        reopen_s = time.perf_counter() - t
        (Path(tmp) / "images.faiss").unlink()
        engine._indexes.clear()
        store.prune_changes("images", store.generation("images"))  # forces the rebuild path
        t = time.perf_counter()
        rebuilt = engine._index("images")
        rebuild_s = time.perf_counter() - t
        assert rebuilt.ntotal == n
        engine.close()
    emit({"vectors": n, "added": n_add, "removed": n_add, "index_type": index.spec.factory,
          "store_fill_s": round(fill_s, 1), "first_build_s": round(build_s, 2),
          "update_s": round(update_s, 3), "reopen_s": round(reopen_s, 3), "full_rebuild_s": round(rebuild_s, 2),
          "speedup": round(rebuild_s / max(update_s, 1e-6), 1)}, as_json)


if __name__ == "__main__":
    main()
