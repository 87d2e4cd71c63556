"""Does the reranker see what recall cannot? The edited-twin diagnostic.

For captions of the Flickr8k dev photos, ``retrieval.twins`` makes twins that
change one thing (a colour, a number, who does what to whom, the action).
Each scorer should rank the original caption above its twin for the
original's photo; the table gives how often it does, per kind:

* recall: the engine's first-stage score (cosine with the query-bank
  correction and text memory, as ``xmr caption`` ranks captions);
* reranker: the cross-attention model's logit alone;
* fused: what the engine ranks a reranked head by (logit + fusion weight x recall).

    python benchmarks/twins.py [--model xmr-lite2 ...] [--per-kind 300] [--json]
"""

from __future__ import annotations

import json
import time

import click


def margins(model: str, dataset: str, split: str, per_kind: int) -> tuple[list, dict]:
    import numpy as np

    from reranker.base import ImageCandidate, fuse
    from reranker.xmr import XmrReranker
    from retrieval.datasets import load_dataset, split_records
    from retrieval.encoders import create_encoder
    from retrieval.training.data import load_pixels
    from retrieval.twins import make_twins

    enc = create_encoder(model)
    records = split_records(load_dataset(dataset, None), split)
    twins = make_twins([r.captions for r in records], per_kind)
    photos = sorted({t.image for t in twins})
    pixels = load_pixels([records[i].path for i in photos], enc.input_size)
    row = {i: n for n, i in enumerate(photos)}
    embs, tokens = [], []
    for s in range(0, len(photos), 32):
        e, t = enc.encode_images_with_tokens(list(pixels[s : s + 32]))
        embs.append(e)
        tokens.append(t)
    embs = np.concatenate(embs)
    tokens = np.concatenate(tokens) if tokens[0] is not None else None
    texts = [t.original for t in twins] + [t.edited for t in twins]
    vecs = enc.encode_texts(texts)
    bank = getattr(enc, "querybank", None)
    bias = bank.text_bias(vecs) if bank is not None else np.zeros(len(texts), np.float32)
    img = embs[[row[t.image] for t in twins]]
    n = len(twins)
    recall = np.einsum("nd,nd->n", np.concatenate([img, img]), vecs) - bias
    out = {"recall": list(recall[:n] - recall[n:])}
    if tokens is not None and getattr(enc, "reranker_model", None) is not None:
        rr = XmrReranker(enc.reranker_model, enc.text_states, enc.fusion_weight)
        logits = np.zeros((n, 2))
        for j, t in enumerate(twins):
            cand = ImageCandidate(None, embs[row[t.image]], tokens[row[t.image]])
            logits[j] = rr.score_image_texts(cand, [t.original, t.edited], None)
        fused = fuse(logits, np.stack([recall[:n], recall[n:]], 1), enc.fusion_weight)
        out["reranker"] = list(logits[:, 0] - logits[:, 1])
        out["fused"] = list(fused[:, 0] - fused[:, 1])
    return twins, out


@click.command()
@click.option("--model", "models", multiple=True, default=("xmr-lite2",), show_default=True)
@click.option("--dataset", default="../shared/datasets/flickr8k", show_default=True)
@click.option("--split", default="dev", show_default=True)
@click.option("--per-kind", default=300, show_default=True, help="at most this many twins of each kind")
@click.option("--json", "as_json", is_flag=True)
def main(models, dataset, split, per_kind, as_json):
    from collections import Counter

    from retrieval.twins import KINDS, preference_table

    rows = []
    for model in models:
        t0 = time.time()
        twins, scored = margins(model, dataset, split, per_kind)
        table = preference_table(twins, scored)
        counts = Counter(t.kind for t in twins)
        rows.append({"model": model, "twins": dict(counts), "percent_right": table,
                     "seconds": round(time.time() - t0, 1)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['model']} ({split}; twins: " + ", ".join(f"{k} {r['twins'].get(k, 0)}" for k in KINDS) + ")")
        print("| scorer | " + " | ".join(KINDS + ("all",)) + " |")
        print("|---" * (len(KINDS) + 2) + "|")
        for name, row in r["percent_right"].items():
            print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.1f}" for k in KINDS + ("all",)) + " |")


if __name__ == "__main__":
    main()
