"""What any runner (local threads, a Ray cluster) relies on, tested without
Ray: a scan split into units lists exactly what the whole scan lists, and an
indexing run whose images come back already embedded builds the index the
local path builds, moves and duplicate files included."""

from __future__ import annotations

import os
import shutil
from itertools import chain

import numpy as np
import pytest

from indexer.pipeline import Embedded, LocalRunner
from indexer.ray_runner import RayOptions, encoder_pool
from indexer.walk import FoundFile, SkippedFile, scan, scan_units
from retrieval import engine as engine_mod
from retrieval.engine import Engine

from .conftest import make_image
from .fakes import COLORS, TokenEncoder


def _tree(root):
    make_image(root / "top-b.jpg")
    make_image(root / "top-a.png", (10, 200, 10))
    (root / "notes.txt").write_text("not an image")
    (root / "phone.heic").write_bytes(b"\0" * 10)
    make_image(root / "a" / "one.jpg")
    make_image(root / "a" / "deeper" / "two.jpg")
    make_image(root / "b" / "three.jpg")
    (root / "empty").mkdir()
    os.symlink(root / "a", root / "link-to-a")  # a folder symlink: not followed
    os.symlink(root / "b" / "three.jpg", root / "b" / "three-again.jpg")  # a file symlink: followed
    os.symlink(root / "missing.jpg", root / "b" / "broken.jpg")


def test_scan_units_list_exactly_what_the_scan_lists(tmp_path):
    photos = tmp_path / "photos"
    _tree(photos)
    single = tmp_path / "single.jpg"
    make_image(single)
    roots = [str(photos), str(single), str(tmp_path / "nowhere"), str(photos / "a")]  # the last lies inside the first
    units = scan_units(roots)
    assert [(os.path.relpath(u.path, tmp_path), u.recursive) for u in units] == [
        ("nowhere", True), ("photos", False), ("photos/a", True), ("photos/b", True), ("photos/empty", True),
        ("single.jpg", True)]
    split = list(chain.from_iterable(scan([u.path], recursive=u.recursive) for u in units))
    whole = list(scan(roots))
    assert split == whole
    assert sum(isinstance(x, FoundFile) for x in whole) == 7
    assert {x.reason for x in whole if isinstance(x, SkippedFile)} == {
        "no such file or folder", "unsupported format (HEIC)", "broken symlink"}


def test_scan_of_a_folder_alone_stays_at_its_top(tmp_path):
    _tree(tmp_path)
    found = [os.path.basename(x.path) for x in scan([tmp_path], recursive=False) if isinstance(x, FoundFile)]
    assert found == ["top-a.png", "top-b.jpg"]


def test_encoder_pool_gives_each_gpu_an_actor_or_shares_the_cpus():
    assert encoder_pool({"CPU": 64, "GPU": 8}, None) == (8, {"num_gpus": 1})
    assert encoder_pool({"CPU": 64, "GPU": 8}, 3) == (3, {"num_gpus": 1})
    assert encoder_pool({"CPU": 2}, None) == (1, {"num_cpus": 1})
    assert encoder_pool({"CPU": 32}, None) == (8, {"num_cpus": 1})
    assert encoder_pool({"CPU": 32}, 2) == (2, {"num_cpus": 1})
    assert encoder_pool({"CPU": 2}, 2) == (1, {"num_cpus": 1})  # one CPU stays for decoding


class EmbeddingRunner(LocalRunner):
    """Reads on threads like LocalRunner, then embeds with an encoder of its
    own and hands back Embedded results, as Ray's encoder actors do."""

    def __init__(self, encoder):
        super().__init__(encoder.prepare, encoder.input_size)
        self.encoder = encoder
        self.description = "a stand-in for a cluster"

    def examined(self, batches, gone_hashes):
        for batch, results in super().examined(batches, gone_hashes):
            todo = [j for j, r in enumerate(results) if isinstance(r, tuple) and r[1] is not None]
            if todo:
                vecs, toks = self.encoder.encode_images_with_tokens([results[j][1][0] for j in todo])
                for n, j in enumerate(todo):
                    sha, (_, w, h) = results[j]
                    results[j] = (sha, Embedded(vecs[n], toks[n], w, h))
            yield batch, results


def _snapshot(engine: Engine) -> dict:
    rows = engine.store.image_rows(range(1, 100))
    tokens = engine._tokens(sorted(rows))
    return {i: (r.path, r.sha256, r.width, r.height, r.token_slot, np.frombuffer(r.embedding, np.float32).tolist(),
                tokens[i].tolist() if i in tokens else None) for i, r in rows.items()}


def test_runs_whose_images_come_back_embedded_build_the_same_index(tmp_path, monkeypatch):
    remote = TokenEncoder()
    monkeypatch.setattr(Engine, "_ray_runner", lambda self, options: EmbeddingRunner(remote))
    photos = tmp_path / "photos"
    for name, color in COLORS.items():
        make_image(photos / "in" / f"{name}.jpg", color)
    built = {}
    for way in ("local", "embedded"):
        folder = tmp_path / way
        shutil.copytree(photos, folder)
        local = TokenEncoder()
        eng = Engine.open(tmp_path / f"index-{way}", create=True, reranker="none", encoder=local)
        ray = RayOptions() if way == "embedded" else None
        first = eng.index([folder], ray=ray)
        # a moved file and two copies of another moved one: the first copy takes the old row,
        # the second is decoded again here and embedded
        os.rename(folder / "in" / "red.jpg", folder / "red.jpg")
        os.rename(folder / "in" / "blue.jpg", folder / "blue.jpg")
        shutil.copy(folder / "blue.jpg", folder / "blue-copy.jpg")
        second = eng.index([folder], ray=ray)
        assert (first.added, second.moved, second.added) == (4, 2, 1)
        snap = _snapshot(eng)
        built[way] = ({i: (os.path.relpath(v[0], folder), *v[1:]) for i, v in snap.items()}, local.images_embedded)
        assert (first.runner == "a stand-in for a cluster") == (way == "embedded")
        eng.close()
    assert built["embedded"][0] == built["local"][0]
    assert built["local"][1] == 5
    assert built["embedded"][1] == 1  # only the second copy of the moved file was embedded in this process
    assert remote.images_embedded == 4


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from retrieval.errors import ClusterUnavailable

    real_import = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    make_image(tmp_path / "photos" / "a.jpg")
    eng = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=TokenEncoder())
    with pytest.raises(ClusterUnavailable, match="pip install 'xmr-search\\[ray\\]'"):
        eng.index([tmp_path / "photos"], ray=RayOptions())
    eng.close()


def test_index_without_ray_never_imports_it(tmp_path):
    import subprocess
    import sys

    make_image(tmp_path / "photos" / "a.jpg")
    code = ("import sys; from retrieval.engine import Engine; from tests.fakes import FakeEncoder;"
            f"e = Engine.open({str(tmp_path / 'index')!r}, reranker='none', encoder=FakeEncoder(), database='');"
            f"e.index([{str(tmp_path / 'photos')!r}]); print('ray' in sys.modules)")
    repo = os.path.dirname(os.path.dirname(engine_mod.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("address, said", [("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"),
                                           ("nonsense", "is not a Ray cluster address")])
def test_a_cluster_nobody_answers_at_is_refused_at_once(tmp_path, address, said):
    pytest.importorskip("ray")
    from click.testing import CliRunner

    from retrieval.cli import cli

    make_image(tmp_path / "photos" / "a.jpg")
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "index"), "index", "--ray-address", address,
                                   str(tmp_path / "photos")])
    assert res.exit_code == 1
    assert said in res.output
