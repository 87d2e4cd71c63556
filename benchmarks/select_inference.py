"""Choose a shipped model's inference settings on the dev split: test-time
views of the image, query-bank normalisation (beta, alpha) and the rerank
fusion weight. Never looks at the test split.

With ``--write-bank`` it first builds the query bank from the *train* split
(every image with the model's configured views, the first two captions of
each image, and which image each caption belongs to) and saves it into the
model's checkpoint folder. ``--write-owners`` adds only the caption owners to
a bank saved before they were kept (the text memory needs them), after
checking a sample of its captions against the train split.

For each set of views and each bank setting (text-memory weight, beta, alpha): dual-encoder recall with the
corrected scores; for the best few settings (and no bank) the reranker's
logits for each image's top-K captions and each caption's top-K images, and
the fusion weight that maximises dev rsum. Each banked row also gets a paired
bootstrap of its dual rsum against the model's current setting (95% interval):
on 1,000 dev images differences of a few points are inside it.

    python benchmarks/select_inference.py --dataset ../shared/datasets/flickr8k [--write-bank | --write-owners]
        [--memory-weights 0,0.2,0.3] [--k 20] [--json]
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

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
@click.option("--write-owners", is_flag=True, help="add caption owners to the model's existing bank")
@click.option("--memory-weights", default="0,0.2,0.3", show_default=True,
              help="text-memory weights to try (comma-separated; 0 = no memory)")
@click.option("--top", default=3, show_default=True, help="bank settings per view set that are reranked")
@click.option("--json", "as_json", is_flag=True)
def main(dataset, split, k, model, view_names, write_bank, write_owners, memory_weights, top, as_json):
    import numpy as np
    import torch

    from retrieval.datasets import load_dataset, split_records
    from retrieval.encoders import create_encoder, resolve_model
    from retrieval.encoders.querybank import QueryBank, bank_from_split
    from retrieval.metrics import bootstrap_rsum_delta, i2t_ranks, retrieval_report, t2i_ranks
    from retrieval.training.calibrate import bank_grid, corrected_scores, setting_fields
    from retrieval.training.rerank import choose_fusion_weight
    from retrieval.training.retune import caption_states

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
        caps, owner = _captions_and_owners(train)
        text_vecs = enc.tower_texts(caps)
        img_vecs = np.concatenate([enc.encode_images(_pixels(enc, train[s : s + 256]))
                                   for s in range(0, len(train), 256)])
        texts, images, text_owner = bank_from_split(text_vecs, img_vecs, owner, captions_per_image=2)
        bank = QueryBank(texts, images, text_owner=text_owner)
        bank.save(location)
        log(f"query bank: {len(bank.texts)} captions, {len(bank.images)} images of the train split, "
            f"views {list(enc.views)} -> {location} ({time.time() - t0:.0f}s)")
    if bank is None:
        raise click.ClickException(f"{model} has no query bank yet; run with --write-bank")
    if write_owners:
        bank = _with_owners(enc, bank, split_records(records, "train"))
        bank.save(location)
        log(f"query bank: caption owners added -> {location}")
    weights = [float(w) for w in memory_weights.split(",")]
    if bank.text_owner is None and any(weights):
        raise click.ClickException("the bank has no caption owners, so no text memory: run with --write-owners")

    recs = split_records(records, split)
    pixels = _pixels(enc, recs)
    captions = [c for r in recs for c in r.captions]
    text_image = np.array([i for i, r in enumerate(recs) for _ in r.captions])
    txt, words, masks = caption_states(enc, captions)
    txt_np = txt.numpy()
    rr = enc.reranker_model

    current = (tuple(enc.views), (bank.memory.weight if bank.memory else 0.0, bank.beta, bank.alpha))
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

        scored = [(None, sim, sim, retrieval_report(sim, text_image)["rsum"])]
        for st, banked in bank_grid(bank, weights):
            s_i2t, s_t2i = corrected_scores(banked, img, txt_np)
            scored.append((st, s_i2t, s_t2i, retrieval_report(s_i2t, text_image, sim_t2i=s_t2i)["rsum"]))
        best = sorted(scored[1:], key=lambda x: -x[3])[:top]
        for st, s_i2t, s_t2i, dual in scored:
            fields = {"querybank": None, "text_memory": None} if st is None else setting_fields(*st)
            row = {"views": vname, **fields, "dual_rsum": round(dual, 1)}
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
                fusion, rep = choose_fusion_weight(cands, text_image)
                row.update({"fusion_weight": fusion, f"rerank_rsum_k{k}": round(rep["rsum"], 1),
                            "seconds": round(time.time() - t0, 1)})
            rows.append(row)
            log(json.dumps(row))
    ref = ranks.get(current)
    for row in rows:
        bank_setting = row["querybank"]
        if ref is not None and bank_setting is not None:
            key = (VIEW_CANDIDATES[row["views"]], (_memory_weight(row["text_memory"]), bank_setting["beta"],
                                                    bank_setting["alpha"]))
            boot = bootstrap_rsum_delta(ref, ranks[key], text_image)
            row["dual_vs_current"] = {k: round(v, 2) for k, v in boot.items()}
    if ref is not None:
        log("dual rsum against the current setting (paired bootstrap, 95%):")
        for row in rows:
            if "dual_vs_current" in row:
                b = row["dual_vs_current"]
                log(f"  {row['views']:<12} memory {_memory_weight(row['text_memory'])} {row['querybank']}: "
                    f"{b['delta']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}]")
    if as_json:
        click.echo(json.dumps({"split": split, "model": model, "rows": rows}))


def _memory_weight(text_memory: dict | None) -> float:
    return float(text_memory["weight"]) if text_memory else 0.0


def _captions_and_owners(records):
    """Every caption of ``records`` in order, and the record row of each."""
    import numpy as np

    return ([c for r in records for c in r.captions],
            np.array([i for i, r in enumerate(records) for _ in r.captions]))


def _with_owners(enc, bank, train, sample: int = 200):
    """The bank with the owner of each caption, derived by the rule that built
    it (the first two captions of each train image, in order); refused unless
    a sample of its captions embeds back to the stored rows."""
    import numpy as np

    from retrieval.encoders.querybank import QueryBank, bank_rows

    caps, owner = _captions_and_owners(train)
    kept = bank_rows(owner)
    text_owner = owner[kept]
    if len(kept) != len(bank.texts) or len(train) != len(bank.images):
        raise click.ClickException(f"the bank holds {len(bank.texts)} captions and {len(bank.images)} images, "
                                   f"the train split gives {len(kept)} and {len(train)}: rebuild it with --write-bank")
    rows = np.linspace(0, len(kept) - 1, min(sample, len(kept))).astype(np.int64)
    cos = (enc.tower_texts([caps[i] for i in kept[rows]]) * bank.texts[rows]).sum(1)
    if cos.min() < 0.995:
        raise click.ClickException(f"the bank's captions do not match the train split (cosine down to "
                                   f"{cos.min():.3f}): rebuild it with --write-bank")
    return QueryBank(bank.texts, bank.images, bank.beta, bank.alpha, text_owner)


if __name__ == "__main__":
    main()
