"""FAISS indexes checked against exact search (the oracle)."""

import numpy as np
import pytest

from indexer.vectors import VectorIndex, build_index, choose_spec, pq_spec, spec_still_fits


def normed(n, d, seed=0, clusters=None):
    rng = np.random.default_rng(seed)
    if clusters:
        centers = rng.normal(size=(clusters, d))
        x = centers[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(base, ids, q, k):
    sims = q @ base.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(sims, order, 1)


def batches_of(ids, vecs, size=1000):
    return lambda: ((ids[s : s + size], vecs[s : s + size]) for s in range(0, len(ids), size))


def test_flat_matches_bruteforce_with_sparse_ids():
    base = normed(3001, 32)
    ids = np.arange(3001, dtype=np.int64) * 7 + 3
    idx = build_index(32, batches_of(ids, base, 333), len(ids), use_gpu=False)
    assert idx.spec.factory == "IDMap2,Flat"
    q = normed(17, 32, seed=1)
    scores, got = idx.search(q, 10)
    want, want_scores = exact_topk(base, ids, q, 10)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (got == want).mean() > 0.99  # ties aside, identical


def test_removal_really_removes_and_selector_filters():
    base = normed(500, 16)
    ids = np.arange(500, dtype=np.int64)
    idx = build_index(16, batches_of(ids, base), 500, use_gpu=False)
    assert idx.remove(range(0, 500, 2)) == 250
    q = normed(5, 16, seed=3)
    _, got = idx.search(q, 20)
    assert (got % 2 == 1).all()
    allowed = np.array([1, 3, 5, 7, 9], dtype=np.int64)
    _, got = idx.search(q, 10, allowed_ids=allowed)
    assert set(got[got >= 0].ravel()) <= set(allowed.tolist())
    assert (got >= 0).sum(axis=1).tolist() == [5] * 5  # all allowed ones found, none dropped


def test_k_larger_than_collection_and_empty_index():
    idx = VectorIndex(8, choose_spec(0), use_gpu=False)
    scores, ids = idx.search(normed(1, 8), 5)
    assert (ids == -1).all()
    idx.add(np.array([4, 9]), normed(2, 8))
    _, ids = idx.search(normed(1, 8), 50)
    assert sorted(ids[0][ids[0] >= 0].tolist()) == [4, 9]


# Embeddings of real collections are clustered; uniform random vectors (no
# structure at all) are the worst case and reach only ~0.82 at these defaults.
@pytest.mark.parametrize("clusters", [200, 1000])
def test_approximate_index_recall_at_10(clusters):
    n, d = 25_000, 64
    base = normed(n, d, seed=5, clusters=clusters)
    ids = np.arange(n, dtype=np.int64) + 100
    idx = build_index(d, batches_of(ids, base, 5000), n, exact_limit=10_000, use_gpu=False)
    assert idx.spec.factory.startswith("IVF")
    q = normed(200, d, seed=6, clusters=clusters)
    _, got = idx.search(q, 10)
    want, _ = exact_topk(base, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("clusters", [200, 1000])
def test_compressed_index_recall_at_10_and_size(clusters):
    """Past the compression limit IVF keeps 8-bit codes: a quarter of the
    memory, recall@10 against exact search still >= 0.95 at the defaults.
    (Limits lowered so the tier shows at test size.)"""
    n, d = 25_000, 64
    base = normed(n, d, seed=5, clusters=clusters)
    ids = np.arange(n, dtype=np.int64) + 100
    idx = build_index(d, batches_of(ids, base, 5000), n, exact_limit=5_000, compress_limit=20_000, use_gpu=False)
    flat = build_index(d, batches_of(ids, base, 5000), n, exact_limit=5_000, use_gpu=False)
    assert idx.spec.factory.endswith(",SQ8") and flat.spec.factory.endswith(",Flat") and idx.ntotal == n
    import faiss

    codes = faiss.extract_index_ivf(idx.index).code_size
    assert codes == d and faiss.extract_index_ivf(flat.index).code_size == 4 * d  # one byte a dimension
    q = normed(200, d, seed=6, clusters=clusters)
    _, got = idx.search(q, 10)
    want, _ = exact_topk(base, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.95, recall


def test_index_tier_follows_the_collection_size():
    assert choose_spec(1_000_000).factory == "IVF4096,Flat"
    assert choose_spec(1_000_001).factory == "IVF4096,SQ8"
    assert choose_spec(10_000_001, dim=257).factory == "OPQ64_256,IVF4096,PQ64"
    assert choose_spec(10_000_001).factory.endswith(",SQ8")  # no dimension given: no product codes
    sq8, pq = choose_spec(9_000_000, dim=257), choose_spec(12_000_000, dim=257)
    assert spec_still_fits(sq8, 12_000_000) and not spec_still_fits(sq8, 12_600_000)
    assert spec_still_fits(pq, 8_000_000) and not spec_still_fits(pq, 7_000_000)
    assert not spec_still_fits(pq, 80_000_000)  # four times the lists it has: rebuilt
    flat, sq8 = choose_spec(900_000), choose_spec(1_300_000)
    assert spec_still_fits(flat, 1_200_000) and not spec_still_fits(flat, 1_300_000)  # grew: compress
    assert spec_still_fits(sq8, 800_000) and not spec_still_fits(sq8, 700_000)  # shrank: back to floats


def test_save_load_roundtrip(tmp_path):
    base = normed(100, 8)
    ids = np.arange(100, dtype=np.int64)
    idx = build_index(8, batches_of(ids, base), 100, use_gpu=False)
    idx.save(tmp_path / "x.faiss", {"generation": 3})
    loaded, side = VectorIndex.load(tmp_path / "x.faiss", use_gpu=False)
    assert side["generation"] == 3 and loaded.ntotal == 100
    assert not list(tmp_path.glob("*.tmp"))
    q = normed(3, 8, seed=9)
    assert (loaded.search(q, 5)[1] == idx.search(q, 5)[1]).all()


class _GpuStandIn:
    """What a GPU copy looks like to the code that searches it: it answers
    like the index it was copied from, and it is no ``IndexIVF`` (a GPU IVF
    index is not), so setting ``nprobe`` through it would fail."""

    def __init__(self, index):
        import faiss

        self._copy = faiss.clone_index(index)
        self.nprobe = faiss.extract_index_ivf(index).nprobe

    def search(self, q, k):
        return self._copy.search(q, k)


def _fake_gpu(monkeypatch, copy):
    import faiss

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", copy, raising=False)


def test_gpu_copy_of_an_ivf_index_takes_its_nprobe(monkeypatch):
    """GPU code path checked on the CPU: an IVF index is copied to the GPU
    with the nprobe of its spec already set, and searched as it is."""
    copies = []
    _fake_gpu(monkeypatch, lambda res, device, index, options=None: copies.append(_GpuStandIn(index)) or copies[-1])
    base = normed(30_000, 16, clusters=200)
    ids = np.arange(30_000, dtype=np.int64) * 3
    on_gpu = build_index(16, batches_of(ids, base, 5000), len(ids), exact_limit=10_000, use_gpu=True)
    on_cpu = build_index(16, batches_of(ids, base, 5000), len(ids), exact_limit=10_000, use_gpu=False)
    q = normed(20, 16, seed=5, clusters=200)
    assert (on_gpu.search(q, 10)[1] == on_cpu.search(q, 10)[1]).all()
    assert len(copies) == 1 and copies[0].nprobe == on_gpu.spec.params["nprobe"] > 1
    on_gpu.add(np.array([1]), q[:1])  # a change drops the GPU copy; the next search makes a new one
    assert on_gpu.search(q[:1], 1)[1][0, 0] == 1 and len(copies) == 2


def test_index_that_cannot_go_to_the_gpu_is_searched_on_the_cpu(monkeypatch, caplog):
    def refuse(res, device, index, options=None):
        raise RuntimeError("Error in index_cpu_to_gpu: not implemented on GPU")

    _fake_gpu(monkeypatch, refuse)
    base = normed(500, 8)
    idx = build_index(8, batches_of(np.arange(500), base), 500, use_gpu=True)
    with caplog.at_level("WARNING", logger="indexer.vectors"):
        found = idx.search(base[:3], 1)[1][:, 0]
    assert found.tolist() == [0, 1, 2] and not idx.use_gpu
    assert "searching it on the CPU" in caplog.text and "not implemented on GPU" in caplog.text


@pytest.mark.gpu
def test_gpu_search_matches_cpu():
    from indexer.vectors import gpu_available

    assert gpu_available(), "faiss sees no GPU"
    base = normed(20_000, 64)
    ids = np.arange(20_000, dtype=np.int64)
    cpu = build_index(64, batches_of(ids, base), len(ids), use_gpu=False)
    gpu = build_index(64, batches_of(ids, base), len(ids), use_gpu=True)
    q = normed(100, 64, seed=2)
    s1, i1 = cpu.search(q, 10)
    s2, i2 = gpu.search(q, 10)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    assert (i1 == i2).mean() > 0.99


def test_ivf_filled_in_two_passes_equals_one_grown_by_adds():
    """build_index allocates each inverted list once (fill); the index it
    makes holds and finds exactly what adding batch by batch gives."""
    base = normed(30_000, 16, clusters=300)
    ids = np.arange(30_000, dtype=np.int64) * 7 + 3
    filled = build_index(16, batches_of(ids, base, 4000), len(ids), exact_limit=10_000, use_gpu=False)
    grown = VectorIndex(16, filled.spec, use_gpu=False)
    grown.index.train(base[: min(len(base), 20_000)])  # the same training sample as build_index takes
    for part_ids, part in batches_of(ids, base, 4000)():
        grown.add(part_ids, part)
    assert filled.ntotal == grown.ntotal == 30_000
    q = normed(50, 16, seed=11, clusters=300)
    s1, i1 = filled.search(q, 10)
    s2, i2 = grown.search(q, 10)
    assert (i1 == i2).all() and np.allclose(s1, s2)
    with pytest.raises(ValueError):
        filled.fill(batches_of(ids, base))  # not empty any more


def test_ivf_fill_keeps_each_vector_in_its_own_list_when_rows_change_between_passes():
    """Another process may add or remove rows between fill's two reads of
    the store: every vector must still land in the list of its own nearest
    centroid (found by searching for itself with nprobe 1)."""
    base = normed(30_000, 16, clusters=300)
    ids = np.arange(30_000, dtype=np.int64)
    reads = []

    def changing():  # the second read lacks rows 100-199 and has 50 new ones at the end
        reads.append(1)
        if len(reads) <= 2:  # the training sample and the first pass
            return batches_of(ids[:29_950], base[:29_950], 4000)()
        keep = np.r_[0:100, 200:30_000]
        return batches_of(ids[keep], base[keep], 4000)()

    idx = build_index(16, changing, 29_950, exact_limit=10_000, use_gpu=False)
    assert idx.ntotal == 29_900
    idx.spec.params["nprobe"] = 1
    found = idx.search(base[np.r_[0:100, 200:30_000]], 1)[1][:, 0]
    assert (found == ids[np.r_[0:100, 200:30_000]]).mean() > 0.999


@pytest.mark.slow
def test_product_codes_filled_in_two_passes_equal_codes_grown_by_adds():
    """fill() rotates the vectors (OPQ) before assigning and adding them, as
    FAISS's own add does: both indexes find the same, and re-scoring the
    top 100 from the float vectors gives recall@10 >= 0.95 against exact
    search on vectors of a real embedding's spectrum."""
    import faiss

    n, d = 12_000, 64
    rng = np.random.default_rng(3)
    sd = np.sqrt((np.arange(1, d + 1) + 20.0) ** -2.3).astype(np.float32)
    centers = rng.standard_normal((60, d)).astype(np.float32) * sd * 0.6
    base = centers[rng.integers(60, size=n)] + rng.standard_normal((n, d)).astype(np.float32) * sd * 0.8
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    spec = pq_spec(n, d)
    assert spec.factory == "OPQ16_64,IVF128,PQ16" and spec.codes == "PQ" and spec.nlist == 128
    filled = VectorIndex(d, spec, use_gpu=False)
    filled.train(base[:4096])
    grown = VectorIndex(d, spec, use_gpu=False)
    grown.index = faiss.deserialize_index(faiss.serialize_index(filled.index))  # the same training
    filled.fill(batches_of(ids, base, 5000))
    for part_ids, part in batches_of(ids, base, 5000)():
        grown.add(part_ids, part)
    assert not filled.exact_scores and filled.ntotal == grown.ntotal == n
    q = base[rng.integers(n, size=100)] + 0.05 * rng.standard_normal((100, d)).astype(np.float32)
    s1, i1 = filled.search(q, 100)
    s2, i2 = grown.search(q, 100)
    assert (i1 == i2).mean() > 0.99
    by_id = dict(zip(ids.tolist(), range(n)))
    got = [c[np.argsort(-(base[[by_id[i] for i in c]] @ qq))][:10] for c, qq in zip(i1, q)]
    want, _ = exact_topk(base, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.95, recall
