"""Token-store compaction at scale: time, file sizes and peak memory.

Indexes N small synthetic images with a stand-in encoder that produces region
tokens of the default model's shape (98 x 128 fp16, 24.5 KB an image), changes
every image so each is embedded again (leaving N dead slots), and indexes
once more: the second run ends with a compaction. The encoder is a stand-in so
that the measurement is the store's own work (the real model would spend
minutes embedding).

    python benchmarks/bench_compact.py --images 40000 [--dir /tmp/xmr-compact] [--json]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
import numpy as np
from report import peak_rss_mb


def _encoder():
    from retrieval.encoders.base import DualEncoder

    class TokenStandIn(DualEncoder):
        """Mean colour as the vector; tokens of the default model's shape."""

        name, version, dim, input_size = "compact-bench", "1", 16, 16
        token_shape = (98, 128)

        def prepare(self, image):
            return np.asarray(image.convert("RGB").resize((16, 16)), np.float32) / 255.0

        def _embed_images(self, prepared):
            out = np.zeros((len(prepared), self.dim), np.float32)
            out[:, :3] = [p.reshape(-1, 3).mean(0) for p in prepared]
            out[:, 3] = 0.05
            return out

        def _embed_texts(self, texts):
            return np.ones((len(texts), self.dim), np.float32)

        def encode_images_with_tokens(self, prepared):
            v = self.encode_images(prepared)
            return v, np.broadcast_to(v[:, None, :1], (len(v),) + self.token_shape).astype(np.float16)

    return TokenStandIn()


def _write_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, color in enumerate(rng.integers(0, 255, (n, 3))):
        Image.new("RGB", (32, 24), tuple(int(c) for c in color)).save(folder / f"{i:06d}.png")


@click.command()
@click.option("--images", "n", type=click.IntRange(1), default=40_000, show_default=True)
@click.option("--dir", "work", type=click.Path(file_okay=False), default="/tmp/xmr-compact", show_default=True,
              help="scratch folder (emptied first)")
@click.option("--json", "as_json", is_flag=True)
def main(n, work, as_json):
    from retrieval import engine as engine_mod
    from retrieval.engine import Engine

    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    photos = work / "photos"
    photos.mkdir(parents=True)
    _write_images(photos, n, 0)
    eng = Engine.open(work / "index", reranker="none", encoder=_encoder())
    eng.index([photos])
    _write_images(photos, n, 1)  # every image changes: embedded again, its old slot dead

    timing = {}
    compact = engine_mod.Engine._compact_tokens

    def timed(self):
        t0 = time.perf_counter()
        compact(self)
        timing["seconds"] = time.perf_counter() - t0

    engine_mod.Engine._compact_tokens = timed
    rss_before = peak_rss_mb()
    eng.index([photos])
    index_dir = work / "index"
    files = sorted(p.name for p in index_dir.glob("tokens*.f16"))
    result = {
        "images": n,
        "file_before_mb": round(2 * n * eng.tokens.slot_bytes / 2**20, 1),
        "file_after_mb": round(sum((index_dir / f).stat().st_size for f in files) / 2**20, 1),
        "token_files": files,
        "compact_s": round(timing.get("seconds", float("nan")), 2),
        "peak_rss_mb_before_second_run": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    shutil.rmtree(work, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key:<32}{value}")


if __name__ == "__main__":
    main()
