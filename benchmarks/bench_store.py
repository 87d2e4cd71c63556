"""The metadata store on SQLite and on PostgreSQL: writing image rows,
reading their vectors back, fetching rows by id, and bytes a row on disk.

PostgreSQL is a throwaway server started as the tests start one
(tests/postgres.py; Debian's postgresql package). Rows look like a photo
library's: 83-character paths, 256-float embeddings, a bias.

    python benchmarks/bench_store.py [--rows 100000] [--json]
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from report import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres


def _batch(b: int, size: int) -> list[dict]:
    rng = np.random.default_rng(b)
    return [dict(path=f"/home/someone/Pictures/2024/holiday-in-the-mountains/day-{b:03d}/IMG_{b:03d}{i:05d}_0001.jpeg",
                 size=2_500_000, mtime_ns=1_700_000_000_000_000_000,
                 sha256=hashlib.sha256(f"{b}-{i}".encode()).hexdigest(), width=4032, height=3024,
                 embedding=rng.standard_normal(256).astype(np.float32), bias=0.01) for i in range(size)]


def _measure(store, n: int, batch: int) -> dict:
    batches = [_batch(b, batch) for b in range(n // batch)]
    t = time.perf_counter()
    for rows in batches:
        store.write_images(rows, [], [], [])
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    read = sum(len(ids) for ids, _, _ in store.iter_vectors("images", 256))
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    store.image_rows(range(1, 41))
    rows_ms = 1000 * (time.perf_counter() - t)
    store.prune_changes("images", store.generation("images"))  # the journal is not part of a row's cost
    return {"write_s": round(write_s, 2), "us_per_row": round(1e6 * write_s / n, 1), "read_s": round(read_s, 2),
            "read_rows": read, "rows_by_id_40_ms": round(rows_ms, 2)}


@click.command()
@click.option("--rows", "n", type=int, default=100_000, show_default=True)
@click.option("--batch", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n, batch, as_json):
    from indexer.database import locate
    from indexer.store import Store
    from tests.postgres import PostgresServer, find_bindir

    result = {"rows": n, "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "x.db"
        store = Store(db)
        result["sqlite"] = _measure(store, n, batch)
        store.close()
        con = sqlite3.connect(db)
        con.execute("VACUUM")
        con.close()
        result["sqlite"]["bytes_per_row"] = round(db.stat().st_size / n)

        bindir = find_bindir()
        if bindir is None:
            result["postgresql"] = "not installed"
        else:
            server = PostgresServer(bindir)
            url = server.start()
            try:
                store = Store(locate(Path(tmp) / "pg", url, create=True))
                result["postgresql"] = _measure(store, n, batch)
                with store.engine.connect() as conn:
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.exec_driver_sql("VACUUM FULL images")
                    total, heap, indexes = conn.exec_driver_sql(
                        "SELECT pg_total_relation_size('images'), pg_relation_size('images'), "
                        "pg_indexes_size('images')").first()
                result["postgresql"].update(bytes_per_row=round(total / n), table_bytes_per_row=round(heap / n),
                                            index_bytes_per_row=round(indexes / n))
                store.close()
            finally:
                server.stop()
    emit(result, as_json)


if __name__ == "__main__":
    main()
