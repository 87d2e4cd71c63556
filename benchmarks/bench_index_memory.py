"""Peak memory of a first import as the collection grows (issue 4: under 2 GB
whatever the collection size).

Creates N files (hard links to a few tiny JPEGs, so making a million costs
seconds and no disk), then indexes them with the real pipeline, store, FAISS
and a stand-in encoder that returns random vectors at once, so the run
measures what the engine itself holds per file: the walk, the list of
changes, the batches, SQLite and the index. The model's own memory is
constant and measured by bench_index.py.

    python benchmarks/bench_index_memory.py --files N [--json]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
from report import emit, peak_rss_mb


def _null_encoder():
    import numpy as np

    from retrieval.encoders.base import DualEncoder

    class NullEncoder(DualEncoder):
        name, version, dim, input_size = "null", "1", 256, 8

        def __init__(self):
            self._rng = np.random.default_rng(0)

        def prepare(self, image):
            return None

        def _embed_images(self, prepared):
            return self._rng.normal(size=(len(prepared), self.dim)).astype(np.float32)

        def _embed_texts(self, texts):
            return self._rng.normal(size=(len(texts), self.dim)).astype(np.float32)

    return NullEncoder()


@click.command()
@click.option("--files", "n_files", type=int, default=100_000, show_default=True)
@click.option("--per-folder", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n_files, per_folder, as_json):
    from PIL import Image

    from retrieval.engine import Engine

    with tempfile.TemporaryDirectory(prefix="xmr-mem-") as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        t0 = time.perf_counter()
        for i in range(n_files):
            if i % 50_000 == 0:  # a file takes at most 65,000 links on ext4
                one = Path(tmp) / f"one-{i}.jpg"
                Image.new("RGB", (8, 8), (120, 60, 30)).save(one)
            folder = root / f"album-{i // per_folder:05d}"
            if i % per_folder == 0:
                folder.mkdir()
            os.link(one, folder / f"photo-{i:07d}-from-a-trip-to-the-seaside.jpg")
        make_s = time.perf_counter() - t0
        engine = Engine.open(Path(tmp) / "index", reranker="none", encoder=_null_encoder())
        rss_before = peak_rss_mb()
        t1 = time.perf_counter()
        summary = engine.index([root])
        seconds = time.perf_counter() - t1
        engine.close()
    out = {"files": n_files, "indexed": summary.added, "seconds": round(seconds, 1),
           "files_per_s": round(summary.added / seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
           "peak_rss_before_indexing_mb": round(rss_before, 1), "making_files_s": round(make_s, 1)}
    emit(out, as_json)


if __name__ == "__main__":
    main()
