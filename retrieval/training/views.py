"""Choose a checkpoint's test-time views of an image on the dev split
(``xmr train``'s views stage).

An image is embedded as the normalised sum of the embeddings of a few views
(the whole square, its mirror, an 85% center crop, its mirror). Which set
serves best depends on how the tower was trained, so it is chosen by
measurement: each candidate set embeds the train images (its own query bank)
and the dev images, the bank's settings are chosen again for it
(``calibrate.score_settings``), and the set with the best dev rsum is kept,
with its bank. Candidates have at most two views: each view is one more
forward pass per indexed image, and indexing on a CPU has to stay fast.

Every single view is computed once per image; a set's embedding is the
normalised sum of its views', as the encoder makes it.
"""

from __future__ import annotations

import time

import numpy as np

from ..encoders.base import l2_normalize
from ..encoders.querybank import QueryBank, bank_rows
from .calibrate import score_settings

VIEW_SETS = {
    "full": ("full",),
    "crop85": ("crop85",),
    "full+flip": ("full", "flip"),
    "crop85+flip": ("crop85", "crop85flip"),
}


def view_embeddings(enc, pixels: np.ndarray, views: tuple[str, ...], batch: int = 64, progress=None) -> dict:
    """``{view: [N, D]}`` normalised embeddings of prepared squares, one view at a time."""
    kept = enc.views
    out = {v: np.zeros((len(pixels), enc.dim), np.float32) for v in views}
    try:
        for s in range(0, len(pixels), batch):
            chunk = list(pixels[s : s + batch])
            for v in views:
                enc.views = (v,)
                out[v][s : s + len(chunk)] = enc.encode_images(chunk)
            if progress:
                progress(len(chunk))
    finally:
        enc.views = kept
    return out


def set_embedding(per_view: dict, views: tuple[str, ...]) -> np.ndarray:
    """A view set's embeddings from its views' (the encoder's rule: normalised sum)."""
    return l2_normalize(sum(per_view[v] for v in views))


def rank_view_sets(train: dict, dev: dict, bank_texts: np.ndarray, bank_owner: np.ndarray, dev_txt: np.ndarray,
                   dev_owner: np.ndarray, candidates: dict = VIEW_SETS, use_bank: bool = True) -> list[dict]:
    """Dev rsum of each candidate view set, best first (pure computation).

    ``train`` / ``dev``: per-view embeddings (:func:`view_embeddings`);
    ``bank_texts`` the bank's caption embeddings, ``bank_owner`` the train
    image of each. With ``use_bank`` each set gets its bank and the best
    setting of the grid; otherwise the plain cosine ranks."""
    rows = []
    for name, views in candidates.items():
        img = set_embedding(dev, views)
        if use_bank:
            bank = QueryBank(bank_texts, set_embedding(train, views), text_owner=bank_owner)
            best = score_settings(bank, img, dev_txt, dev_owner)[1]
        else:
            best = _plain(img, dev_txt, dev_owner)
        rows.append({"views": list(views), "name": name, "querybank": best["querybank"],
                     "text_memory": best["text_memory"], "dev": best["report"]})
    return sorted(rows, key=lambda r: -r["dev"]["rsum"])


def _plain(img: np.ndarray, txt: np.ndarray, owner: np.ndarray) -> dict:
    from ..metrics import retrieval_report

    return {"querybank": None, "text_memory": None, "report": retrieval_report(img @ txt.T, owner)}


def choose_views_in_place(ckpt, dataset: str, images: str | None = None, limit: int | None = None,
                          candidates: dict = VIEW_SETS, progress_factory=None) -> dict:
    """Choose the views of checkpoint folder ``ckpt`` on the dataset's dev
    split and write them there, with the query bank built for them when the
    checkpoint uses one; returns the summary written to its config."""
    from ..encoders import checkpoint
    from ..encoders.memory import MemorySettings
    from ..encoders.xmr import XmrEncoder
    from .data import load_pixels, retuning_splits

    t0 = time.time()
    enc = XmrEncoder.from_checkpoint(str(ckpt))
    use_bank = enc.querybank is not None
    recs = retuning_splits(dataset, images, limit)
    singles = tuple(dict.fromkeys(v for views in candidates.values() for v in views))
    per_view = {}
    for split in ("train", "dev") if use_bank else ("dev",):
        bar = progress_factory(f"views of {split} images", len(recs[split])) if progress_factory else None
        pixels = load_pixels([r.path for r in recs[split]], enc.input_size)
        per_view[split] = view_embeddings(enc, pixels, singles, progress=bar.update if bar else None)
        if bar:
            bar.close()
    owner = {s: np.array([i for i, r in enumerate(recs[s]) for _ in r.captions]) for s in ("train", "dev")}
    dev_txt = enc.tower_texts([c for r in recs["dev"] for c in r.captions])
    bank_texts = bank_owner = None
    if use_bank:  # the bank keeps the first two captions of each train image
        keep = bank_rows(owner["train"], 2)
        train_caps = [c for r in recs["train"] for c in r.captions]
        bank_texts = enc.tower_texts([train_caps[i] for i in keep])
        bank_owner = owner["train"][keep]
    rows = rank_view_sets(per_view.get("train"), per_view["dev"], bank_texts, bank_owner, dev_txt, owner["dev"],
                          candidates, use_bank)
    best, before = rows[0], next((r for r in rows if tuple(r["views"]) == tuple(enc.views)), None)
    summary = {"dataset": str(dataset), "limit": limit, "image_backend": enc.image_backend,
               "chosen": best["name"], "views_before": list(enc.views),
               "dev_before": before["dev"] if before else None, "dev_after": best["dev"],
               "rows": [{"views": r["name"], "querybank": r["querybank"], "text_memory": r["text_memory"],
                         "dev_rsum": round(r["dev"]["rsum"], 2)} for r in rows],
               "seconds": round(time.time() - t0, 1)}
    config = {"views": best["views"], "view_selection": summary}
    if use_bank:
        memory = MemorySettings(**best["text_memory"]) if best["text_memory"] else None
        QueryBank(bank_texts, set_embedding(per_view["train"], tuple(best["views"])), **best["querybank"],
                  text_owner=bank_owner, memory=memory).save(ckpt)
        config.update({"querybank": best["querybank"], "text_memory": best["text_memory"]})
    checkpoint.save_checkpoint(ckpt, config)
    return summary
