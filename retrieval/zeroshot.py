"""Zero-shot classification through the real engine, the way CLIP's paper
measures it: a folder of class folders is indexed into a temporary index,
each class becomes one caption (its name in one or more prompt templates,
see :meth:`Engine.import_labels`), and image -> caption picks the class.

Reports, in percent: top-1 and top-5 accuracy (image -> caption), and text
-> image precision at the class's size (the first template's prompt finds
how many of its class's images among as many results).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import DEFAULT_TEMPLATES, Engine, check_templates
from .errors import DatasetError
from .evaluation import index_with_bar, temporary_engine

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ClassSet:
    """A labelled folder: one sub-folder per class, ``_`` read as a space."""

    root: Path
    classes: list[str]
    images: list[tuple[str, int]]  # (absolute path, class index)

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> "ClassSet":
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder; --classes takes a folder with one sub-folder per class")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes, images = [], []
        for folder in folders:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                continue
            images.extend((os.path.abspath(p), len(classes)) for p in files)
            classes.append(folder.name.replace("_", " ").strip())
        if len(classes) < 2:
            raise DatasetError(f"{root}: found {len(classes)} class folder(s) with images; zero-shot evaluation "
                               "needs at least two sub-folders of images, one per class")
        return cls(root, classes, images)


def evaluate_classes(folder: str | os.PathLike, model: str | None = None,
                     templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES, rerank_ks=(0,),
                     progress=None) -> list[dict]:
    """One result per entry of ``rerank_ks`` (0: the dual encoder alone; K:
    reranking the top K), all from one temporary index."""
    t0 = time.time()
    templates = check_templates(templates)
    data = ClassSet.from_folder(folder)
    out = []
    with tempfile.TemporaryDirectory(prefix="xmr-zeroshot-") as tmp:
        engine = temporary_engine(tmp, model, rerank_ks)
        try:
            paths = [p for p, _ in data.images]
            summary = index_with_bar(engine, paths, f"indexing {data.root.name}", progress)
            skipped = sum(summary.skipped.values())
            known = set(engine.store.states_of(paths)) if skipped else None
            labelled = [(p, c) for p, c in data.images if known is None or p in known]
            engine.import_labels(data.classes, templates)
            index_seconds = time.time() - t0
            for k in rerank_ks:
                t1 = time.time()
                use_rr = k > 0 and engine.reranker is not None
                out.append({
                    **_score(engine, data, labelled, templates, use_rr, k, progress),
                    "rerank_k": k if use_rr else 0, "classes": len(data.classes), "images": len(labelled),
                    "skipped": skipped, "templates": len(templates), "model": engine.encoder.name,
                    "seconds": round(index_seconds + time.time() - t1, 1),
                })
        finally:
            engine.close()
    return out


def _score(engine: Engine, data: ClassSet, labelled, templates: list[str], rerank: bool, rerank_k: int,
           progress) -> dict:
    n_top = min(5, len(data.classes))
    top1 = top5 = 0
    bar = progress("classifying", len(labelled) + len(data.classes)) if progress else None
    try:
        for path, label in labelled:
            hits = engine.caption(path, k=n_top, rerank=rerank, rerank_k=rerank_k)
            names = [h.image for h in hits]
            top1 += bool(names) and names[0] == data.classes[label]
            top5 += data.classes[label] in names
            if bar:
                bar.update(1)
        sizes = [0] * len(data.classes)
        for _, label in labelled:
            sizes[label] += 1
        by_path = {p: c for p, c in labelled}
        precision = []
        for c, name in enumerate(data.classes):
            if sizes[c]:
                hits = engine.search(templates[0].format(name), k=sizes[c], rerank=rerank, rerank_k=rerank_k)
                precision.append(sum(by_path.get(h.path) == c for h in hits) / sizes[c])
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    n = max(len(labelled), 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n,
            "text_precision": 100.0 * sum(precision) / max(len(precision), 1)}
