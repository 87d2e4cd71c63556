"""A FAISS index too big to build in one piece: trained once on a sample,
filled shard by shard (each shard an independent job that writes its own
file, so shards run in parallel on any map: threads here, Ray tasks on a
cluster), then merged on disk into one index whose inverted lists live in
an ``.ivfdata`` file read through a memory map (FAISS's
``OnDiskInvertedLists``, via ``faiss.contrib.ondisk``).

The kind built here is ``OPQ{m}_{d},IVF{nlist},PQ{m}``: a learned rotation
to ``d`` dimensions (a multiple of ``m``; xmr's vectors have 257, the
query-bank bias included), an inverted file, and ``m`` bytes of product
codes a vector. Scores from codes are estimates: callers fetch several
times the hits they want and re-score them exactly from the stored vectors
(:func:`rescore`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vectors import IndexSpec, VectorIndex

log = logging.getLogger(__name__)

# Shards: (shard number, a function giving that shard's (ids, vectors)).
Shard = tuple[int, Callable[[], tuple[np.ndarray, np.ndarray]]]


def train_empty(spec: IndexSpec, dim: int, sample: np.ndarray):
    """An empty FAISS index of ``spec``, trained on ``sample`` (inner product)."""
    index = VectorIndex(dim, spec, use_gpu=False)
    index.train(sample)
    return index.index


def fill_shard(trained_path: str | os.PathLike, shard: Shard, out_dir: str | os.PathLike,
               batch: int = 100_000) -> str:
    """Add one shard's vectors to a copy of the trained index and write it as
    ``shard-NNNNN.faiss`` in ``out_dir`` (written under a temporary name,
    then renamed: a shard file present is a shard complete, so a retried job
    redoes only what is missing). Returns the file's path."""
    import faiss

    number, load = shard
    out = Path(out_dir) / f"shard-{number:05d}.faiss"
    if out.exists():
        return str(out)
    index = faiss.read_index(str(trained_path))
    ids, vectors = load()
    for s in range(0, len(ids), batch):
        index.add_with_ids(np.ascontiguousarray(vectors[s : s + batch], dtype=np.float32),
                           np.ascontiguousarray(ids[s : s + batch], dtype=np.int64))
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out)
    return str(out)


def thread_map(workers: int) -> Callable[[Callable, Iterable], list]:
    """A map over ``workers`` threads (FAISS releases the GIL while adding)."""
    def run(fn, items):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))
    return run


@dataclass
class ShardedBuild:
    path: Path  # the merged index; its inverted lists are in path + ".ivfdata"
    ntotal: int
    shards: int
    train_s: float  # training on the sample
    fill_s: float  # every shard filled and written
    merge_s: float  # the shards merged on disk


def build_sharded(spec: IndexSpec, dim: int, sample: np.ndarray, shards: Sequence[Shard],
                  out: str | os.PathLike, parallel_map: Callable[[Callable, Iterable], list] | None = None,
                  work_dir: str | os.PathLike | None = None) -> ShardedBuild:
    """Train ``spec`` on ``sample``, fill every shard (through
    ``parallel_map``, default: two threads; ``ray_runner.ray_map()`` runs
    them as Ray tasks, with ``work_dir`` on storage every node shares), merge
    the shards on disk into ``out`` (and ``out.ivfdata``), and delete the
    shard files."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".shards")
    work.mkdir(parents=True, exist_ok=True)
    trained_path = work / "trained.faiss"
    t0 = time.perf_counter()
    if not trained_path.exists():
        tmp = work / "trained.faiss.tmp"
        faiss.write_index(train_empty(spec, dim, sample), str(tmp))
        os.replace(tmp, trained_path)
    t1 = time.perf_counter()
    run = parallel_map or thread_map(2)
    files = sorted(run(lambda shard: fill_shard(trained_path, shard, work), list(shards)))
    t2 = time.perf_counter()
    index = faiss.read_index(str(trained_path))
    ivfdata = out.with_name(out.name + ".ivfdata")
    ivfdata.unlink(missing_ok=True)
    merge_ondisk(index, files, str(ivfdata))
    tmp = out.with_name(out.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out)
    ntotal = int(index.ntotal)
    for f in files:
        Path(f).unlink()
    trained_path.unlink()
    work.rmdir()
    log.info("merged %d shards of %s into %s (%d vectors)", len(files), spec.factory, out, ntotal)
    return ShardedBuild(out, ntotal, len(files), t1 - t0, t2 - t1, time.perf_counter() - t2)


def open_sharded(path: str | os.PathLike, spec: IndexSpec):
    """The merged index, ``nprobe`` set. Its inverted lists stay in the
    ``.ivfdata`` file, which FAISS maps into memory (``IO_FLAG_MMAP`` would
    map the index file itself as well, and then searches crash: FAISS 1.15)."""
    import faiss

    index = faiss.read_index(str(path))
    faiss.extract_index_ivf(index).nprobe = spec.params.get("nprobe", 32)
    return index


def rescore(queries: np.ndarray, candidates: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) per query among its ``candidates`` ids
    (-1: none), from the stored vectors ``vectors_of(ids)``."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for q, cand in enumerate(candidates):
        cand = cand[cand >= 0]
        if not len(cand):
            continue
        exact = vectors_of(cand) @ queries[q]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[q, : len(top)], ids[q, : len(top)] = exact[top], cand[top]
    return scores, ids
