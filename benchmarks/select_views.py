"""Choose the shipped model's inference settings on the dev split: test-time
views of the image and the rerank fusion weight.

For each set of views: dual-encoder recall, then the reranker's logits for
each image's top-K captions and each caption's top-K images, and the fusion
weight that maximises dev rsum. Never looks at the test split.

    python benchmarks/select_views.py --dataset ../shared/datasets/flickr8k [--k 20] [--json]
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import click

CANDIDATES = [("full",), ("crop85",), ("full", "flip"), ("full", "flip", "crop85", "crop85flip")]


@click.command()
@click.option("--dataset", required=True, type=click.Path(exists=True))
@click.option("--split", default="dev", show_default=True)
@click.option("--k", default=20, show_default=True)
@click.option("--model", default="xmr-lite2", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(dataset, split, k, model, as_json):
    import numpy as np
    import torch

    from indexer.decode import decode_image
    from retrieval.datasets import load_dataset, split_records
    from retrieval.encoders import create_encoder
    from retrieval.metrics import retrieval_report
    from retrieval.training.rerank import choose_fusion_weight

    if split == "test":
        raise click.ClickException("selection must not look at the test split")
    enc = create_encoder(model, device="cpu")
    recs = split_records(load_dataset(dataset), split)
    with ThreadPoolExecutor(4) as pool:
        pixels = list(pool.map(lambda r: enc.prepare(decode_image(r.path, enc.input_size).image), recs))
    captions = [c for r in recs for c in r.captions]
    text_image = np.array([i for i, r in enumerate(recs) for _ in r.captions])
    txt, words, masks = [], [], []
    for s in range(0, len(captions), 256):
        e, w, m = enc.text_states(captions[s : s + 256])
        pad = enc.model.config.text_max_len - w.shape[1]
        txt.append(e)
        words.append(torch.nn.functional.pad(w, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
    txt, words, masks = torch.cat(txt), torch.cat(words), torch.cat(masks)
    rr = enc.reranker_model

    def logits(img_idx, txt_idx, img_emb, tokens):
        out = []
        with torch.inference_mode():
            for s in range(0, len(img_idx), 512):
                i, t = img_idx[s : s + 512], txt_idx[s : s + 512]
                out.append(rr(torch.from_numpy(tokens[i]).float(), words[t], masks[t],
                              torch.from_numpy(img_emb[i]), txt[t]).numpy())
        return np.concatenate(out)

    rows = []
    for views in CANDIDATES:
        t0 = time.time()
        enc.views = views
        img, tokens = enc.encode_images_with_tokens(pixels)
        sim = img @ txt.numpy().T
        dual = retrieval_report(sim, text_image)["rsum"]
        i2t = np.argsort(-sim, axis=1)[:, :k]
        t2i = np.argsort(-sim.T, axis=1)[:, :k]
        ri = np.repeat(np.arange(len(recs)), k)
        rt = np.repeat(np.arange(len(captions)), k)
        cands = {"sim": sim,
                 "i2t": (ri, i2t.ravel(), logits(ri, i2t.ravel(), img, tokens)),
                 "t2i": (t2i.ravel(), rt, logits(t2i.ravel(), rt, img, tokens))}
        weight, rep = choose_fusion_weight(cands, text_image)
        rows.append({"views": list(views), "dual_rsum": round(dual, 1), "fusion_weight": weight,
                     f"rerank_rsum_k{k}": round(rep["rsum"], 1), "seconds": round(time.time() - t0, 1)})
        if not as_json:
            click.echo(json.dumps(rows[-1]))
    if as_json:
        click.echo(json.dumps({"split": split, "model": model, "rows": rows}))


if __name__ == "__main__":
    main()
