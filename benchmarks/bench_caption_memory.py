"""Peak memory and speed of importing a caption collection as it grows
(issue 4's memory target, for `xmr captions import`).

Writes a caption file of N distinct synthetic captions in one of the
formats `xmr captions import` reads, imports it into a fresh index with a
stand-in encoder that returns random vectors at once (so the run measures
what the engine holds per caption: parsing, duplicate checks, SQLite and the
FAISS index, not the text tower), then imports the same file again (every
caption a duplicate).

    python benchmarks/bench_caption_memory.py --captions N [--format flickr|karpathy|csv|text] [--json]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
from bench_index_memory import _null_encoder
from report import emit, peak_rss_mb

WORDS = ("a", "dog", "child", "red", "runs", "across", "the", "beach", "two", "people", "sit", "on", "bench",
         "near", "water", "black", "white", "jumps", "over", "fence", "in", "park", "woman", "street")


def _caption(i: int) -> str:
    words = [WORDS[(i // len(WORDS) ** k + 7 * k) % len(WORDS)] for k in range(9)]
    return " ".join(words) + f" number {i} ."


def write_captions(path: Path, n: int, fmt: str, per_image: int = 5) -> None:
    """``n`` distinct captions, ``per_image`` to an image name."""
    if fmt == "karpathy":
        images = [{"filename": f"photo-{j:08d}.jpg", "split": "test",
                   "sentences": [{"raw": _caption(i)} for i in range(j * per_image, min(n, (j + 1) * per_image))]}
                  for j in range((n + per_image - 1) // per_image)]
        path.write_text(json.dumps({"images": images, "dataset": "synthetic"}))
        return
    with path.open("w") as f:
        if fmt == "csv":
            f.write("image,caption\n")
        for i in range(n):
            name, cap = f"photo-{i // per_image:08d}.jpg", _caption(i)
            f.write({"flickr": f"{name}#{i % per_image}\t{cap}\n", "csv": f"{name},{cap}\n",
                     "text": f"{cap}\n"}[fmt])


@click.command()
@click.option("--captions", "n", type=int, default=100_000, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["flickr", "karpathy", "csv", "text"]), default="flickr",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n, fmt, as_json):
    from retrieval.engine import Engine

    with tempfile.TemporaryDirectory(prefix="xmr-capmem-") as tmp:
        path = Path(tmp) / f"captions.{ {'karpathy': 'json', 'csv': 'csv'}.get(fmt, 'txt') }"
        t0 = time.perf_counter()
        write_captions(path, n, fmt)
        make_s = time.perf_counter() - t0
        engine = Engine.open(Path(tmp) / "index", reranker="none", encoder=_null_encoder())
        rss_before = peak_rss_mb()
        t1 = time.perf_counter()
        first = engine.import_captions(path)
        first_s = time.perf_counter() - t1
        rss_first = peak_rss_mb()
        t2 = time.perf_counter()
        again = engine.import_captions(path)
        again_s = time.perf_counter() - t2
        engine.close()
        size_mb = path.stat().st_size / 1e6
    out = {"captions": n, "format": fmt, "file_mb": round(size_mb, 1), "imported": first["imported"],
           "seconds": round(first_s, 1), "captions_per_s": round(first["imported"] / first_s, 1),
           "peak_rss_mb": round(rss_first, 1), "reimport_duplicates": again["duplicates"],
           "reimport_seconds": round(again_s, 1), "peak_rss_after_reimport_mb": round(peak_rss_mb(), 1),
           "peak_rss_before_import_mb": round(rss_before, 1), "making_file_s": round(make_s, 1)}
    emit(out, as_json)


if __name__ == "__main__":
    main()
