"""An index built from shards and merged on disk finds what one built in a
single piece finds, and a retried shard job does not add its vectors twice."""

import numpy as np
import pytest

from indexer.shards import build_sharded, fill_shard, open_sharded, rescore, train_empty
from indexer.vectors import pq_spec


def _vectors(n, d, seed=0):
    rng = np.random.default_rng(seed)
    sd = np.sqrt((np.arange(1, d + 1) + 20.0) ** -2.3).astype(np.float32)
    centers = rng.standard_normal((40, d)).astype(np.float32) * sd * 0.6
    x = centers[rng.integers(40, size=n)] + rng.standard_normal((n, d)).astype(np.float32) * sd * 0.8
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
def test_shards_merged_on_disk_equal_one_index(tmp_path):
    import faiss

    n, d = 9000, 32
    base = _vectors(n, d)
    ids = np.arange(n, dtype=np.int64) * 5 + 2
    spec = pq_spec(n, d, nlist=64)
    assert spec.factory == "OPQ8_32,IVF64,PQ8"
    shards = [(k, (lambda s: lambda: (ids[s : s + 3000], base[s : s + 3000]))(s)) for k, s in enumerate((0, 3000, 6000))]
    trained = train_empty(spec, d, base[:4096])
    (tmp_path / "work").mkdir()
    faiss.write_index(trained, str(tmp_path / "work" / "trained.faiss"))  # build_sharded takes it as trained
    built = build_sharded(spec, d, base[:10], shards, tmp_path / "images.faiss", work_dir=tmp_path / "work")
    assert built.ntotal == n and built.shards == 3
    assert (tmp_path / "images.faiss.ivfdata").stat().st_size >= n * (8 + 8)  # codes and ids on disk
    assert not (tmp_path / "work").exists()  # shard files and the trained copy are gone
    merged = open_sharded(built.path, spec)

    whole = trained  # the same rotation, quantizer and codebooks, filled in one piece in memory
    whole.add_with_ids(base, ids)
    faiss.extract_index_ivf(whole).nprobe = spec.params["nprobe"]
    q = base[::97][:60]
    s1, i1 = merged.search(q, 50)
    s2, i2 = whole.search(q, 50)
    assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-5)

    by_id = dict(zip(ids.tolist(), range(n)))
    _, top = rescore(q, i1, lambda c: base[[by_id[int(i)] for i in c]], 10)
    exact = ids[np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :10]]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, exact)]) >= 0.95


def test_a_retried_shard_job_keeps_the_first_result(tmp_path):
    import faiss

    n, d = 3000, 16
    base = _vectors(n, d, seed=1)
    spec = pq_spec(n, d, nlist=64)
    trained = tmp_path / "trained.faiss"
    faiss.write_index(train_empty(spec, d, base), str(trained))
    calls = []

    def load():
        calls.append(1)
        return np.arange(n, dtype=np.int64), base

    first = fill_shard(trained, (0, load), tmp_path)
    again = fill_shard(trained, (0, load), tmp_path)  # a retry after the shard was written
    assert first == again and len(calls) == 1
    assert faiss.read_index(first).ntotal == n
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
