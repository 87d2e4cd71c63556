"""End-to-end indexing speed: decode, encode, FAISS, SQLite.

    python benchmarks/bench_index.py --images DIR [--device cpu|cuda] [--limit N] [--repeat R] [--json]
        [--ray-address local|HOST:PORT]

``encoder_only_images_per_s`` is the model's forward pass alone on the same
batches (already decoded): the ceiling the pipeline is compared against.
``--repeat R`` links every image R times (to fill a run with few originals).
``--ray-address`` runs the listing, decoding and encoder on Ray (``local``:
a runtime of this machine; the timed run includes joining the cluster and
starting the encoder actors).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
from report import emit, peak_rss_mb


@click.command()
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--device", default="cpu", show_default=True)
@click.option("--model", default="xmr-lite2", show_default=True)
@click.option("--limit", type=int, default=None, help="Index only the first N images.")
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--processes", type=int, default=0, show_default=True, help="decoding processes (0: threads)")
@click.option("--ray-address", default=None, help="index on Ray: local, or a cluster's HOST:PORT")
@click.option("--json", "as_json", is_flag=True)
def main(images, device, model, limit, repeat, batch_size, processes, ray_address, as_json):
    from indexer.decode import is_image_name

    files = sorted(p for p in Path(images).iterdir() if is_image_name(p.name))
    if limit:
        files = files[:limit]
    emit(measure(files, model, device, repeat, batch_size, processes, ray_address), as_json)


def measure(files: list[Path], model: str | None, device: str = "cpu", repeat: int = 1, batch_size: int = 32,
            processes: int = 0, ray_address: str | None = None) -> dict:
    """``xmr index`` of ``files`` (each linked ``repeat`` times) into a new
    index, and the model's encoder alone on already decoded batches."""
    import torch

    from indexer.decode import decode_image
    from indexer.ray_runner import RayOptions
    from retrieval.engine import Engine

    with tempfile.TemporaryDirectory(prefix="xmr-bench-") as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        for r in range(repeat):
            for f in files:
                os.symlink(f.resolve(), src / f"{r}_{f.name}")
        engine = Engine.open(Path(tmp) / "index", model=model, device=device, reranker="auto")
        n = len(files) * repeat
        t0 = time.perf_counter()
        ray = RayOptions(address=ray_address) if ray_address else None
        summary = engine.index([src], batch_size=batch_size, processes=processes, ray=ray)
        seconds = time.perf_counter() - t0
        # encoder-only ceiling on the same kind of batches
        enc = engine.encoder
        sample = [enc.prepare(decode_image(f, enc.input_size).image) for f in files[: min(len(files), 4 * batch_size)]]
        enc.encode_images_with_tokens(sample[:batch_size])  # warm-up
        t1 = time.perf_counter()
        done = 0
        for s in range(0, len(sample), batch_size):
            enc.encode_images_with_tokens(sample[s : s + batch_size])
            done += len(sample[s : s + batch_size])
        if device == "cuda":
            torch.cuda.synchronize()
        enc_rate = done / (time.perf_counter() - t1)
        engine.close()
    return {
        "images": n, "indexed": summary.added, "seconds": round(seconds, 2),
        "images_per_s": round(summary.added / seconds, 2), "encoder_only_images_per_s": round(enc_rate, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "device": device, "model": engine.encoder.name,
        "image_backend": getattr(enc, "image_backend", "torch"), "decode_processes": processes,
        "views": list(getattr(enc, "views", ())), "runner": summary.runner,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()
