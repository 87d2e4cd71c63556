"""Indexing on Ray (``xmr index --ray``) builds the index the single-process
path builds: same ids, vectors (within 1e-5), region tokens and search
results on 200 Flickr8k photos, on a local Ray runtime and on a two-node
cluster on this machine; a killed encoder actor loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

from retrieval.engine import Engine  # noqa: E402

from .ray_cluster import RayCluster, ray_command  # noqa: E402

pytestmark = pytest.mark.slow

QUERIES = ["a dog running on grass", "children playing in the water", "a man on a bicycle", "a red car"]


@pytest.fixture(scope="module")
def photos(flickr8k, tmp_path_factory) -> Path:
    """The first 200 Flickr8k photos in a tree: 60 at the top, 70 in a
    subfolder, 70 two levels down (listing tasks get several folders)."""
    names = sorted(os.listdir(flickr8k / "Flicker8k_Dataset"))[:200]
    root = tmp_path_factory.mktemp("photos")
    for n, name in enumerate(names):
        folder = root if n < 60 else root / "sub1" if n < 130 else root / "sub2" / "deep"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(flickr8k / "Flicker8k_Dataset" / name)
    return root


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """Index folders built by the single-process path, one per model."""
    built: dict[str, Path] = {}

    def build(model: str) -> Path:
        if model not in built:
            idx = tmp_path_factory.mktemp(f"reference-{model}")
            engine = Engine.open(idx, model=model, database="")
            try:
                summary = engine.index([photos])
            finally:
                engine.close()
            assert summary.added == 200
            built[model] = idx
        return built[model]

    return build


def xmr_index(idx: Path, photos: Path, model: str, *ray_args: str, env: dict | None = None, database: str = "",
              **popen):
    cmd = [sys.executable, "-m", "retrieval.cli", "--index", str(idx), "index", "-q", "--model", model,
           *ray_args, str(photos)]
    env = {**(env or os.environ), "XMR_DATABASE": database}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def assert_same_index(ref: Path, other: Path) -> None:
    a, b = Engine.open(ref, create=False), Engine.open(other, create=False)
    try:
        ids = list(range(1, 401))
        rows_a, rows_b = a.store.image_rows(ids), b.store.image_rows(ids)
        assert len(rows_a) == 200

        def facts(rows):
            return {i: (r.path, r.sha256, r.size, r.mtime_ns, r.width, r.height, r.token_slot) for i, r in rows.items()}

        assert facts(rows_b) == facts(rows_a)
        va = np.stack([np.frombuffer(rows_a[i].embedding, np.float32) for i in sorted(rows_a)])
        vb = np.stack([np.frombuffer(rows_b[i].embedding, np.float32) for i in sorted(rows_a)])
        np.testing.assert_allclose(vb, va, rtol=0, atol=1e-5)
        bias_a = np.array([rows_a[i].bias if rows_a[i].bias is not None else np.nan for i in sorted(rows_a)])
        bias_b = np.array([rows_b[i].bias if rows_b[i].bias is not None else np.nan for i in sorted(rows_a)])
        np.testing.assert_allclose(bias_b, bias_a, rtol=0, atol=1e-5)
        if a.tokens is not None:
            ta, tb = a._tokens(sorted(rows_a)), b._tokens(sorted(rows_a))
            assert sorted(ta) == sorted(tb) == sorted(rows_a)
            worst = max(float(np.abs(ta[i].astype(np.float32) - tb[i].astype(np.float32)).max()) for i in ta)
            assert worst <= 2e-3  # float16 tokens: one unit in the last place near 1
        for q in QUERIES:
            hits_a, hits_b = a.search(q, k=10), b.search(q, k=10)
            assert [h.id for h in hits_b] == [h.id for h in hits_a], q
    finally:
        a.close()
        b.close()


@pytest.fixture
def ray_tmp():
    """A short folder for a local Ray runtime's logs and sockets, removed after."""
    path = tempfile.mkdtemp(prefix="xmr-ray-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_local_ray_runtime_builds_the_same_index(photos, reference, tmp_path, ray_tmp):
    idx = tmp_path / "index"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    out = finish(xmr_index(idx, photos, "xmr-lite2-open", "--ray", "--ray-address", "local", env=env))
    assert "added 200" in out
    assert_same_index(reference("xmr-lite2-open"), idx)
    # a second run over the same folders finds nothing to do
    out = finish(xmr_index(idx, photos, "xmr-lite2-open", "--ray", "--ray-address", "local", env=env))
    assert "added 0, updated 0, moved 0, removed 0, unchanged 200" in out


def test_ray_writing_to_postgresql_builds_the_same_index(photos, reference, tmp_path, ray_tmp, postgres_url):
    """The cluster's usual partner: rows in PostgreSQL, written by the one process."""
    idx = tmp_path / "index"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    out = finish(xmr_index(idx, photos, "xmr-lite2-open", "--ray-address", "local", env=env, database=postgres_url))
    assert "added 200" in out
    assert (idx / "database.json").exists() and not (idx / "xmr.db").exists()
    assert_same_index(reference("xmr-lite2-open"), idx)


@pytest.fixture(scope="module")
def cluster():
    if ray_command() is None:
        pytest.skip("no `ray` command")
    c = RayCluster(nodes=2, cpus_per_node=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_two_node_cluster_builds_the_same_index(photos, reference, cluster, tmp_path):
    idx = tmp_path / "index"
    out = finish(xmr_index(idx, photos, "xmr-lite2-open", "--ray-address", cluster.address, env=cluster.env))
    assert "Ray cluster: 2 nodes" in out
    assert "added 200" in out
    assert_same_index(reference("xmr-lite2-open"), idx)


def _encoder_actors() -> set[int]:
    """Pids of Ray encoder actors on this machine (their process titles name the class)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::") and b"_Encode" in cmdline:
                pids.add(int(entry))
    return pids


def _images(idx: Path) -> int:
    try:
        with sqlite3.connect(f"file:{idx / 'xmr.db'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("select count(*) from images").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's worker processes in /proc")
def test_killed_encoder_actor_loses_nothing(photos, reference, cluster, tmp_path):
    """SIGKILL the encoder actor once some batches are written: Ray restarts it,
    its in-flight batch is embedded again, and the index comes out whole,
    with region tokens (xmr-lite2 has a reranker)."""
    idx = tmp_path / "index"
    proc = xmr_index(idx, photos, "xmr-lite2", "--ray-address", cluster.address, "--batch-size", "8",
                     "--ray-batch-size", "16", env=cluster.env)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        actors = _encoder_actors()
        if actors and 16 <= _images(idx) <= 120:
            killed = min(actors)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    assert killed is not None, "the run ended before an encoder actor could be killed"
    restarted = set()
    while proc.poll() is None and not restarted:
        restarted = _encoder_actors() - {killed}
        time.sleep(0.1)
    out = finish(proc)
    assert restarted, "no encoder actor took over"
    assert "added 200" in out
    assert_same_index(reference("xmr-lite2"), idx)


def test_shards_filled_as_ray_tasks_merge_into_the_same_index(tmp_path, ray_tmp):
    """build_sharded's shards as Ray tasks (a local runtime of 2 CPUs) give the
    index threads give."""
    import faiss
    import ray

    from indexer.ray_runner import ray_map
    from indexer.shards import build_sharded, open_sharded
    from indexer.vectors import pq_spec

    rng = np.random.default_rng(3)
    n, d = 6000, 32
    base = rng.standard_normal((n, d)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    spec = pq_spec(n, d, nlist=32)
    shards = [(k, (lambda s: lambda: (ids[s : s + 2000], base[s : s + 2000]))(s)) for k, s in enumerate((0, 2000, 4000))]
    q = base[::101]
    results = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        for way, mapper in (("threads", None), ("ray", ray_map())):
            work = tmp_path / way
            work.mkdir()
            trained = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
            trained.train(base[:4000])  # the same trained index for both ways
            faiss.write_index(trained, str(work / "trained.faiss"))
            built = build_sharded(spec, d, base[:10], shards, tmp_path / f"{way}.faiss", parallel_map=mapper,
                                  work_dir=work)
            assert built.ntotal == n and built.shards == 3
            results.append(open_sharded(built.path, spec).search(q, 20))
    finally:
        ray.shutdown()
    (s1, i1), (s2, i2) = results
    assert (i1 == i2).all() and np.allclose(s1, s2, atol=1e-6)
