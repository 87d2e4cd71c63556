"""OPQ + IVF-PQ built from shards and merged on disk (indexer/shards.py), at
millions of vectors, against exact search.

Synthetic clustered unit vectors of the engine's width (256 dimensions and
the query bank's bias column: 257) stand in for a collection; no model runs.
They are written shard by shard to a float32 file in the work folder (the
"stored vectors" that re-scoring reads, as the engine reads them from its
database), never held in memory all at once. Ground truth is exact inner
product search over that file. Reports build time per million, bytes per
vector, recall@10 against exact search from the codes alone and after exact
re-scoring of the top ``rescore x 10``, query latency, and the build's peak
memory (the build runs in a child process that reads its shards with plain
reads, so the figure is the build's own). With ``--workdir``, the vectors
and the ground truth are kept for the next run with the same sizes.

    python benchmarks/bench_ivfpq.py --vectors 1000000 [--shard-size 1000000] [--code-bytes 64]
        [--nprobe 16,32,64] [--rescore 10,20] [--spectrum real|flat] [--workdir DIR] [--json]
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
from report import emit

DIM = 256


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
BIAS_STD = 0.031  # the spread of xmr-lite2's query-bank biases on Flickr8k test images


class Collection:
    """Clustered unit vectors with a bias column, made shard by shard from
    fixed seeds (the same ids, the same vectors, in any order).

    ``spectrum="real"``: centres and spread share the variance spectrum of
    real xmr image embeddings, lambda_i ~ (i + 40)^-2.3 (fitted to
    ``xmr-lite2-open`` embeddings of the 6,000 Flickr8k train images, whose
    effective dimension is 70), turned by a random rotation, 35% of it
    between clusters. 6,000 such vectors have effective dimension 59 (76% of
    the variance in 50 directions; the real ones: 70%) and nearest
    neighbours that score about as real ones do (top-1 / top-10 / top-100
    cosine 0.55 / 0.48 / 0.36; real: 0.61 / 0.48 / 0.32). ``"flat"``: every direction alike (as
    bench_query's vectors), far harder for product codes than real vectors."""

    def __init__(self, n: int, shard_size: int, path: Path, spectrum: str = "real"):
        self.n, self.shard_size, self.path = n, shard_size, path
        rng = np.random.default_rng(0)
        k = max(16, n // 200)
        if spectrum == "real":
            scale = ((np.arange(1, DIM + 1) + 40.0) ** -2.3)
            self.sd = np.sqrt(scale / scale.sum()).astype(np.float32)
            self.rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
            self.between = 0.35
        else:
            self.sd, self.rotation, self.between = np.ones(DIM, np.float32), None, 1 / (1 + 0.36)
        self.centers = rng.standard_normal((k, DIM), dtype=np.float32) * self.sd * np.sqrt(self.between)

    def sample(self, g: np.random.Generator, m: int) -> np.ndarray:
        x = self.centers[g.integers(len(self.centers), size=m)]
        x += g.standard_normal((m, DIM), dtype=np.float32) * (self.sd * np.sqrt(1 - self.between))
        if self.rotation is not None:
            x = x @ self.rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.hstack([x, (BIAS_STD * g.standard_normal(m, dtype=np.float32))[:, None]])

    def write(self) -> np.memmap:
        """The vectors file (kept from an earlier run in the same --workdir
        when it has the same shape), memory-mapped."""
        if self.path.exists():
            kept = np.load(self.path, mmap_mode="r")
            if kept.shape == (self.n, DIM + 1):
                return kept
        store = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.n, DIM + 1))
        for s in range(0, self.n, self.shard_size):  # one generator a shard; written 100,000 rows at a time
            g = np.random.default_rng(1000 + s // self.shard_size)
            for c in range(s, min(s + self.shard_size, self.n), 100_000):
                m = min(100_000, s + self.shard_size - c, self.n - c)
                store[c : c + m] = self.sample(g, m)
        store.flush()
        return np.load(self.path, mmap_mode="r")

    def queries(self, m: int) -> np.ndarray:
        q = self.sample(np.random.default_rng(3), m)
        q[:, DIM] = 1.0  # a query takes each item's bias as it is, as the engine's corrected queries do
        return np.ascontiguousarray(q)


class ShardRows:
    """One shard's (ids, vectors), read from the vectors file with plain
    reads (not a memory map), as a worker on another machine would load its
    shard; picklable, so a child process can run it."""

    def __init__(self, path: Path, start: int, stop: int):
        self.path, self.start, self.stop = path, start, stop

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        with open(self.path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            offset = f.tell() + self.start * (DIM + 1) * 4
        rows = np.fromfile(self.path, np.float32, (self.stop - self.start) * (DIM + 1), offset=offset)
        return np.arange(self.start, self.stop, dtype=np.int64), rows.reshape(-1, DIM + 1)


def _build_in_child(spec, sample_path: Path, shards, out: Path, workers: int):
    """build_sharded in this (child) process; returns its result and this
    process's peak memory: the build's own, apart from the benchmark's
    generation and ground truth."""
    from indexer.shards import build_sharded, thread_map

    built = build_sharded(spec, DIM + 1, np.load(sample_path), shards, out, parallel_map=thread_map(workers))
    return built, _peak_since_exec_mb()


def _peak_since_exec_mb() -> float:
    """This process's peak resident memory since it started its program
    (VmHWM; getrusage's figure also counts what the parent held when it forked)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def exact_top(store: np.ndarray, queries: np.ndarray, k: int, chunk: int = 25_000) -> np.ndarray:
    """Exact top-``k`` ids per query, streaming over the stored vectors."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(store), chunk):
        scores = np.asarray(store[s : s + chunk]) @ queries.T  # (chunk, q)
        top = np.argpartition(-scores, k, axis=0)[:k].T  # (q, k)
        cand_s = np.concatenate([best_s, np.take_along_axis(scores.T, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, top + s], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


@click.command()
@click.option("--vectors", "n", type=int, required=True)
@click.option("--shard-size", type=int, default=1_000_000, show_default=True)
@click.option("--code-bytes", type=int, default=64, show_default=True)
@click.option("--nlist", type=int, default=None, help="default: what pq_spec picks")
@click.option("--nprobe", default=None, help="lists searched; several: 16,32,64 (default: what pq_spec picks)")
@click.option("--rescore", default="10", show_default=True, help="candidates fetched per hit wanted; several: 10,20")
@click.option("--train", "train_n", type=int, default=None, help="training sample (default: 64 x nlist)")
@click.option("--workers", type=int, default=1, show_default=True, help="shards filled at once (threads)")
@click.option("--spectrum", type=click.Choice(["real", "flat"]), default="real", show_default=True,
              help="the synthetic vectors' variance spectrum (see Collection)")
@click.option("--queries", "n_queries", type=int, default=1000, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="where the vectors and the index go (default: a temporary folder, deleted after)")
@click.option("--json", "as_json", is_flag=True)
def main(n, shard_size, code_bytes, nlist, nprobe, rescore, train_n, workers, spectrum, n_queries, workdir, as_json):
    import faiss

    from indexer.shards import open_sharded
    from indexer.shards import rescore as exact_rescore
    from indexer.vectors import pq_spec

    own = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="xmr-ivfpq-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        coll = Collection(n, shard_size, work / "vectors.npy", spectrum)
        t = time.perf_counter()
        store = coll.write()
        gen_s = time.perf_counter() - t
        queries = coll.queries(n_queries)
        t = time.perf_counter()
        truth_path = work / f"truth-{n_queries}.npy"
        if truth_path.exists() and gen_s < 1:  # kept vectors, kept truth
            truth = np.load(truth_path)
        else:
            truth = exact_top(store, queries, 10)
            np.save(truth_path, truth)
        truth_s = time.perf_counter() - t

        nprobes = [int(v) for v in nprobe.split(",")] if nprobe else None
        rescores = [int(v) for v in rescore.split(",")]
        spec = pq_spec(n, DIM + 1, code_bytes, None, rescores[0], nlist)
        nprobes = nprobes or [spec.params["nprobe"]]
        n_lists = int(next(p for p in spec.factory.split(",") if p.startswith("IVF"))[3:])
        train_n = min(n, train_n or 64 * n_lists)
        np.save(work / "sample.npy", np.asarray(store[np.sort(np.random.default_rng(5).choice(n, train_n, replace=False))]))
        shards = [(i, ShardRows(coll.path, s, min(s + shard_size, n))) for i, s in enumerate(range(0, n, shard_size))]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            built, build_peak_mb = child.submit(_build_in_child, spec, work / "sample.npy", shards,
                                                work / "images.faiss", workers).result()
        index_bytes = built.path.stat().st_size
        ivfdata_bytes = Path(str(built.path) + ".ivfdata").stat().st_size

        rss_before = current_rss_mb()
        index = open_sharded(built.path, spec)
        ivf = faiss.extract_index_ivf(index)
        want = 10
        settings = []
        for probe in nprobes:
            ivf.nprobe = probe
            _, codes_only = index.search(queries, want)
            for factor in rescores:
                _, cand = index.search(queries, want * factor)
                _, rescored = exact_rescore(queries, cand, lambda ids: np.asarray(store[ids]), want)
                lat_search, lat_total = [], []
                for q in queries[:200]:  # one query at a time, as a search request runs
                    t0 = time.perf_counter()
                    _, c = index.search(q[None], want * factor)
                    t1 = time.perf_counter()
                    exact_rescore(q[None], c, lambda ids: np.asarray(store[ids]), want)
                    lat_search.append(t1 - t0)
                    lat_total.append(time.perf_counter() - t0)
                settings.append({
                    "nprobe": probe, "rescore": factor,
                    "recall_at_10_codes": round(recall_at(codes_only, truth), 4),
                    "recall_at_10_rescored": round(recall_at(rescored, truth), 4),
                    "p50_ms_search": round(1000 * float(np.median(lat_search)), 2),
                    "p50_ms_with_rescore": round(1000 * float(np.median(lat_total)), 2),
                    "p95_ms_with_rescore": round(1000 * float(np.percentile(lat_total, 95)), 2)})
        result = {
            "vectors": n, "dim": DIM + 1, "spectrum": spectrum, "index_type": spec.factory,
            "shards": built.shards, "shard_size": shard_size, "workers": workers, "train_sample": train_n,
            "faiss_threads": faiss.omp_get_max_threads(),
            "generate_s": round(gen_s, 1), "exact_truth_s": round(truth_s, 1),
            "train_s": round(built.train_s, 1), "fill_s": round(built.fill_s, 1), "merge_s": round(built.merge_s, 1),
            "fill_and_merge_s_per_million": round((built.fill_s + built.merge_s) / (n / 1e6), 1),
            "bytes_per_vector_ivfdata": round(ivfdata_bytes / n, 1),
            "bytes_per_vector_total": round((ivfdata_bytes + index_bytes) / n, 1),
            "index_file_mb": round(index_bytes / 2**20, 1),
            "rss_growth_mb_open_and_search": round(current_rss_mb() - rss_before, 0),
            "build_peak_rss_mb": round(build_peak_mb, 0),
            "settings": settings,
        }
        emit(result, as_json)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
