"""Indexing speed against what a user would otherwise run: CLIP ViT-B/32 in
eager PyTorch on the CPU, as rclip does.

The reference's speed does not depend on its weights, so it is built from
transformers' CLIP vision configuration (ViT-B/32 at 224 px, projection to
512) with random weights. In the same run and on the same images: ``xmr
index`` end to end and xmr's encoder alone (``bench_index.measure``), then
the reference end to end (Pillow decode, resize of the short side to 224,
centre crop, normalise, forward pass in batches) and its forward pass alone.

    python benchmarks/bench_vs_clip.py --images DIR [--limit 1000] [--model M] [--json]

prints {"xmr_images_per_s", "clip_images_per_s", "ratio",
"xmr_encoder_only_images_per_s", "clip_encoder_only_images_per_s", ...}.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
from bench_index import measure
from report import emit

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SIZE = 224


def clip_pixels(path: Path) -> np.ndarray:
    """The reference's preprocessing of one file: ``float32 [3, 224, 224]``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = SIZE / min(w, h)
        im = im.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - SIZE) // 2, (h - SIZE) // 2
        arr = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def clip_reference():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=SIZE, patch_size=32, projection_dim=512)
    return CLIPVisionModelWithProjection(config).eval()


def clip_speed(files: list[Path], batch_size: int) -> tuple[float, float]:
    """(images/s end to end, images/s of the forward pass alone)."""
    import torch

    model = clip_reference()
    with torch.inference_mode():
        model(pixel_values=torch.zeros(2, 3, SIZE, SIZE))  # warm-up
        t0 = time.perf_counter()
        forward = 0.0
        for s in range(0, len(files), batch_size):
            batch = torch.from_numpy(np.stack([clip_pixels(f) for f in files[s : s + batch_size]]))
            t1 = time.perf_counter()
            model(pixel_values=batch)
            forward += time.perf_counter() - t1
        total = time.perf_counter() - t0
    return len(files) / total, len(files) / forward


@click.command()
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--limit", type=int, default=1000, show_default=True, help="the first N images of the folder")
@click.option("--model", default=None, help="xmr model [default: the default model]")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(images, limit, model, batch_size, as_json):
    import torch

    from indexer.decode import is_image_name

    files = sorted(p for p in Path(images).iterdir() if is_image_name(p.name))[:limit]
    xmr = measure(files, model, batch_size=batch_size)
    clip_rate, clip_forward = clip_speed(files, batch_size)
    emit({
        "images": len(files), "model": xmr["model"], "image_backend": xmr["image_backend"],
        "xmr_images_per_s": xmr["images_per_s"], "clip_images_per_s": round(clip_rate, 2),
        "ratio": round(xmr["images_per_s"] / clip_rate, 2),
        "xmr_encoder_only_images_per_s": xmr["encoder_only_images_per_s"],
        "clip_encoder_only_images_per_s": round(clip_forward, 2),
        "encoder_only_ratio": round(xmr["encoder_only_images_per_s"] / clip_forward, 2),
        "torch_threads": torch.get_num_threads(),
    }, as_json)


if __name__ == "__main__":
    main()
