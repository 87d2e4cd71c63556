"""Choose a shipped model's inference settings on the dev split: test-time
views of the image, query-bank normalisation (beta, alpha) and the rerank
fusion weight. Never looks at the test split.

With ``--write-bank`` it first builds the query bank from the *train* split
(every image with the model's configured views, the first two captions of
each image) and saves it into the model's checkpoint folder.

For each set of views and each bank setting: dual-encoder recall with the
corrected scores; for the best few settings (and no bank) the reranker's
logits for each image's top-K captions and each caption's top-K images, and
the fusion weight that maximises dev rsum. Each banked row also gets a paired
bootstrap of its dual rsum against the model's current setting (95% interval):
on 1,000 dev images differences of a few points are inside it.

    python benchmarks/select_inference.py --dataset ../shared/datasets/flickr8k [--write-bank] [--k 20] [--json]
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import click

VIEW_CANDIDATES = {"crop85": ("crop85",), "crop85+flip": ("crop85", "crop85flip"), "full+crop85": ("full", "crop85"),
                   "full+flip": ("full", "flip"), "tta4": ("full", "flip", "crop85", "crop85flip")}


def _pixels(enc, records):
    from indexer.decode import decode_image

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda r: enc.prepare(decode_image(r.path, enc.input_size).image), records))


@click.command()
@click.option("--dataset", required=True, type=click.Path(exists=True))
@click.option("--split", default="dev", show_default=True)
@click.option("--k", default=20, show_default=True)
@click.option("--model", default="xmr-lite2", show_default=True)
@click.option("--views", "view_names", multiple=True, type=click.Choice(sorted(VIEW_CANDIDATES)),
              help="view sets to try (default: all)")
@click.option("--write-bank", is_flag=True, help="build the query bank from the train split and save it")
@click.option("--top", default=3, show_default=True, help="bank settings per view set that are reranked")
@click.option("--json", "as_json", is_flag=True)
def main(dataset, split, k, model, view_names, write_bank, top, as_json):
    import numpy as np
    import torch

    from retrieval.datasets import load_dataset, split_records
    from retrieval.encoders import create_encoder, resolve_model
    from retrieval.encoders.querybank import QueryBank, bank_from_split
    from retrieval.metrics import bootstrap_rsum_delta, i2t_ranks, retrieval_report, t2i_ranks
    from retrieval.training.calibrate import ALPHAS, BETAS, corrected_scores
    from retrieval.training.retune import caption_states
    from retrieval.training.rerank import choose_fusion_weight

    if split in ("test", "train"):
        raise click.ClickException("selection runs on the dev split")
    kind, location = resolve_model(model)
    if kind != "xmr":
        raise click.ClickException("give the checkpoint's own name (a variant shares its bank)")
    enc = create_encoder(model, device="cpu")
    records = load_dataset(dataset)
    log = (lambda *a: None) if as_json else (lambda msg: click.echo(msg, err=True))

    bank = enc.querybank
    if write_bank:
        t0 = time.time()
        train = split_records(records, "train")
        caps = [c for r in train for c in r.captions]
        owner = np.array([i for i, r in enumerate(train) for _ in r.captions])
        text_vecs = enc.encode_texts(caps)
        img_vecs = np.concatenate([enc.encode_images(_pixels(enc, train[s : s + 256]))
                                   for s in range(0, len(train), 256)])
        bank = QueryBank(*bank_from_split(text_vecs, img_vecs, owner, captions_per_image=2))
        bank.save(location)
        log(f"query bank: {len(bank.texts)} captions, {len(bank.images)} images of the train split, "
            f"views {list(enc.views)} -> {location} ({time.time() - t0:.0f}s)")
    if bank is None:
        raise click.ClickException(f"{model} has no query bank yet; run with --write-bank")

    recs = split_records(records, split)
    pixels = _pixels(enc, recs)
    captions = [c for r in recs for c in r.captions]
    text_image = np.array([i for i, r in enumerate(recs) for _ in r.captions])
    txt, words, masks = caption_states(enc, captions)
    txt_np = txt.numpy()
    rr = enc.reranker_model

    current = (tuple(enc.views), (bank.beta, bank.alpha))
    ranks, rows = {}, []
    for vname in view_names or VIEW_CANDIDATES:
        enc.views = VIEW_CANDIDATES[vname]
        img, tokens = enc.encode_images_with_tokens(pixels)
        sim = img @ txt_np.T
        cache: dict[tuple[int, int], float] = {}

        def logits(img_idx, txt_idx):
            todo = sorted({(int(i), int(t)) for i, t in zip(img_idx, txt_idx)} - cache.keys())
            with torch.inference_mode():
                for s in range(0, len(todo), 512):
                    i = np.array([p[0] for p in todo[s : s + 512]])
                    t = np.array([p[1] for p in todo[s : s + 512]])
                    out = rr(torch.from_numpy(tokens[i]).float(), words[t], masks[t],
                             torch.from_numpy(img[i]), txt[t]).numpy()
                    cache.update(zip(todo[s : s + 512], out.tolist()))
            return np.array([cache[(int(i), int(t))] for i, t in zip(img_idx, txt_idx)])

        settings = [None] + list(product(BETAS, ALPHAS))
        scored = []
        for st in settings:
            s_i2t, s_t2i = corrected_scores(None if st is None else bank.with_settings(*st), img, txt_np)
            scored.append((st, s_i2t, s_t2i, retrieval_report(s_i2t, text_image, sim_t2i=s_t2i)["rsum"]))
        best = sorted(scored[1:], key=lambda x: -x[3])[:top]
        for st, s_i2t, s_t2i, dual in scored:
            row = {"views": vname, "querybank": None if st is None else {"beta": st[0], "alpha": st[1]},
                   "dual_rsum": round(dual, 1)}
            if st is not None:
                ranks[(VIEW_CANDIDATES[vname], st)] = (i2t_ranks(s_i2t, text_image), t2i_ranks(s_t2i, text_image))
            if st is None or any(st == b[0] for b in best):
                t0 = time.time()
                i2t = np.argsort(-s_i2t, axis=1)[:, :k]
                t2i = np.argsort(-s_t2i.T, axis=1)[:, :k]
                ri = np.repeat(np.arange(len(recs)), k)
                rt = np.repeat(np.arange(len(captions)), k)
                # the fusion adds the recall score the engine ranked by: the corrected one
                fused_sim = {"i2t": s_i2t, "t2i": s_t2i}
                cands = {"sim": sim, "recall": fused_sim,
                         "i2t": (ri, i2t.ravel(), logits(ri, i2t.ravel())),
                         "t2i": (t2i.ravel(), rt, logits(t2i.ravel(), rt))}
                weight, rep = choose_fusion_weight(cands, text_image)
                row.update({"fusion_weight": weight, f"rerank_rsum_k{k}": round(rep["rsum"], 1),
                            "seconds": round(time.time() - t0, 1)})
            rows.append(row)
            log(json.dumps(row))
    ref = ranks.get(current)
    for row in rows:
        bank_setting = row["querybank"]
        if ref is not None and bank_setting is not None:
            key = (VIEW_CANDIDATES[row["views"]], (bank_setting["beta"], bank_setting["alpha"]))
            boot = bootstrap_rsum_delta(ref, ranks[key], text_image)
            row["dual_vs_current"] = {k: round(v, 2) for k, v in boot.items()}
    if ref is not None:
        log("dual rsum against the current setting (paired bootstrap, 95%):")
        for row in rows:
            if "dual_vs_current" in row:
                b = row["dual_vs_current"]
                log(f"  {row['views']:<12} {row['querybank']}: {b['delta']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}]")
    if as_json:
        click.echo(json.dumps({"split": split, "model": model, "rows": rows}))


if __name__ == "__main__":
    main()
