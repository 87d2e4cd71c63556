"""End-to-end CLI tests with the real default model on flickr8k-mini."""

import json
import os

import pytest
from click.testing import CliRunner

from retrieval.cli import cli

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases

COMMANDS = ["index", "search", "similar", "captions", "caption", "remove", "status", "eval", "train", "quantize",
            "retune-reranker", "serve", "upgrade"]


def run(args, index_dir, ok=True):
    res = CliRunner().invoke(cli, ["--index", str(index_dir)] + args, catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_every_command_has_help():
    for name in COMMANDS:
        res = CliRunner().invoke(cli, [name, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, name
    assert CliRunner().invoke(cli, ["captions", "import", "--help"]).exit_code == 0


def test_status_of_missing_index(tmp_path):
    res = run(["status", "--json"], tmp_path / "none")
    info = json.loads(res.output)
    assert info["images"] == 0 and info["exists"] is False


def test_empty_results_say_why(tmp_path, mini_images):
    empty = tmp_path / "empty"
    empty.mkdir()
    run(["index", str(empty)], tmp_path / "index")
    res = run(["search", "a dog"], tmp_path / "index")
    assert "holds no images yet" in res.output and "xmr index FOLDER" in res.output
    run(["index", str(mini_images)], tmp_path / "index")
    res = run(["search", "a dog", "--under", str(tmp_path / "nowhere")], tmp_path / "index")
    assert "no indexed images below" in res.output
    assert json.loads(run(["search", "a dog", "--under", str(empty), "--json"], tmp_path / "index").output) == []


def test_search_on_missing_index_says_how_to_create(tmp_path):
    res = run(["search", "a dog"], tmp_path / "none", ok=False)
    assert res.exit_code != 0 and "xmr --index" in res.output


@pytest.mark.slow
def test_default_model_is_the_open_world_one(tmp_path, mini_images):
    idx = tmp_path / "index"
    run(["index", str(mini_images)], idx)
    status = json.loads(run(["status", "--json"], idx).output)
    assert status["model"] == "xmr-lite2-open" and status["reranker"] is None and status["querybank"]
    hits = json.loads(run(["search", "a dog running on the grass", "-k", "3", "--json"], idx).output)
    assert len(hits) == 3 and not any(h["reranked"] for h in hits)


@pytest.mark.slow
def test_full_cli_flow(tmp_path, mini_images, mini_dataset):
    idx = tmp_path / "index"
    res = run(["index", str(mini_images), "--model", "xmr-lite2"], idx)  # the model with a reranker
    assert "added 32" in res.output
    res = run(["index", str(mini_images)], idx)
    assert "added 0" in res.output and "unchanged 32" in res.output

    # xmr-lite2's reranker measured no gain over recall: by default it is not used
    default = json.loads(run(["search", "a dog running on the grass", "-k", "5", "--json"], idx).output)
    assert not any(h["reranked"] for h in default)
    res = run(["search", "a dog running on the grass", "-k", "5", "--json", "--rerank-k", "20"], idx)
    hits = json.loads(res.output)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(os.path.isabs(h["path"]) and isinstance(h["score"], float) for h in hits)
    assert hits[0]["reranked"] is True
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    plain = json.loads(run(["search", "a dog running on the grass", "-k", "5", "--json", "--no-rerank"], idx).output)
    assert all(h["reranked"] is False for h in plain)

    tokens = mini_dataset / "Flickr8k_text" / "Flickr8k.token.txt"
    res = run(["captions", "import", str(tokens)], idx)
    assert "imported 160" in res.output

    # image -> captions: the photo's own captions should rank high among 160
    name = sorted(os.listdir(mini_images))[0]
    own = {ln.split("\t", 1)[1].strip() for ln in tokens.read_text().splitlines() if ln.startswith(name + "#")}
    caps = json.loads(run(["caption", str(mini_images / name), "-k", "5", "--json"], idx).output)
    assert len(caps) == 5 and all("caption" in c for c in caps)
    assert own & {c["caption"] for c in caps}

    sim = json.loads(run(["similar", str(mini_images / name), "-k", "3", "--json"], idx).output)
    assert len(sim) == 3 and all(h["path"] != str(mini_images / name) for h in sim)

    status = json.loads(run(["status", "--json"], idx).output)
    assert status["images"] == 32 and status["captions"] == 160 and status["upgrade_needed"] is None
    assert status["model"] == "xmr-lite2" and status["dim"] == 256 and status["index_type"] == "IDMap2,Flat"
    assert status["reranker"] == "xmr-cross-attention" and status["rerank_k"] == 0

    # the same index as the previous release left it (same image side, other text
    # side): refused until `xmr upgrade`, which makes it what this release builds
    from retrieval.encoders import create_encoder
    from tests.conftest import index_store

    earlier = create_encoder("xmr-lite2").earlier_versions[0]
    store = index_store(idx)
    from sqlalchemy import text

    with store.session() as s, s.begin():
        s.execute(text("UPDATE images SET bias = 0.5"))
        s.execute(text("UPDATE captions SET bias = NULL, embedding = :z"), {"z": bytes(1024)})
    store.set_meta(model_version=earlier, image_side="")
    store.close()
    pending = json.loads(run(["status", "--json"], idx).output)
    assert pending["upgrade_needed"] == f"built with version {earlier}: run xmr upgrade" and pending["images"] == 32
    for ask in (["search", "a dog"], ["caption", str(mini_images / name)]):
        res = run(ask, idx, ok=False)
        assert res.exit_code == 1 and f"xmr --index {idx} upgrade" in res.output, res.output
    gens = {n: json.loads((idx / f"{n}.faiss.json").read_text())["generation"] for n in ("images", "captions")}
    assert "upgraded" in run(["upgrade"], idx).output and "up to date" in run(["upgrade"], idx).output
    for n, before in gens.items():  # the FAISS files were rebuilt from the rewritten rows, not trusted
        assert json.loads((idx / f"{n}.faiss.json").read_text())["generation"] == before + 1
    for got, want, key in ((run(["search", "a dog running on the grass", "-k", "5", "--json"], idx), default, "path"),
                           (run(["caption", str(mini_images / name), "-k", "5", "--json"], idx), caps, "caption")):
        got = json.loads(got.output)
        assert [h[key] for h in got] == [h[key] for h in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want)) < 1e-3

    res = run(["remove", str(mini_images / name)], idx)
    assert "removed 1" in res.output
    status = json.loads(run(["status", "--json"], idx).output)
    assert status["images"] == 31
    human = run(["search", "people", "-k", "2"], idx).output
    assert str(mini_images) in human


@pytest.mark.slow
def test_index_files_one_by_one_with_worker_processes(tmp_path, mini_images):
    """`xmr index *.jpg --processes 2`: every file as its own root, decoded in
    worker processes with the default model's preprocessing; same vectors as threads."""
    files = sorted(str(mini_images / n) for n in os.listdir(mini_images))
    res = run(["index", *files, "--processes", "2"], tmp_path / "p")
    assert "added 32" in res.output
    run(["index", str(mini_images)], tmp_path / "t")
    from retrieval.engine import Engine

    a = Engine.open(tmp_path / "p", reranker="none")
    b = Engine.open(tmp_path / "t", reranker="none")
    for f in files[:5]:
        assert a.store.image_by_path(f).embedding == b.store.image_by_path(f).embedding


@pytest.mark.slow
def test_retune_reranker_writes_a_loadable_checkpoint(tmp_path, flickr8k):
    """`xmr retune-reranker` on a few images: a new checkpoint whose reranker
    changed but whose region projection (the stored tokens) did not."""
    import torch

    from retrieval.encoders import builtin_models, checkpoint, create_encoder

    out = tmp_path / "retuned"
    res = CliRunner().invoke(cli, ["retune-reranker", "xmr-lite2", "--dataset", str(flickr8k), "--out", str(out),
                                   "--limit", "24", "--pool", "16"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [h["epoch"] for h in info["history"]] == [0, 1]
    meta = checkpoint.read_config(out)
    assert meta["reranker_retune"]["options"]["pool"] == 16
    assert meta["fusion_weight"] == info["fusion_weight"]
    old = checkpoint.load_reranker(builtin_models()["xmr-lite2"]).state_dict()
    new = checkpoint.load_reranker(out).state_dict()
    proj = [k for k in old if k.startswith("level_proj.")]
    assert proj and all(torch.equal(old[k], new[k]) for k in proj)
    if info["best_epoch"] == 1:  # the epoch was kept: the rest of the reranker moved
        assert any(not torch.equal(old[k], new[k]) for k in old if k not in proj)
    enc = create_encoder(str(out), device="cpu")
    assert enc.encode_texts(["a dog"]).shape == (1, enc.dim)
    # what an index stores did not change: the int8 graph stays current, and the
    # model version too unless the fusion weight moved
    import numpy as np

    enc.encode_images([np.zeros((enc.input_size, enc.input_size, 3), np.uint8)])
    assert enc.image_backend == "int8"
    shipped = create_encoder("xmr-lite2", device="cpu")
    assert checkpoint.image_weights_digest(out) == checkpoint.image_weights_digest(builtin_models()["xmr-lite2"])
    assert (enc.version == shipped.version) == (info["fusion_weight"] == shipped.fusion_weight)
    # a second run into the same folder is refused, nothing overwritten
    again = CliRunner().invoke(cli, ["retune-reranker", "xmr-lite2", "--dataset", str(flickr8k), "--out", str(out)])
    assert again.exit_code != 0 and "not empty" in again.output


@pytest.mark.slow
def test_retune_reranker_from_another_model_with_crossfitting(tmp_path, flickr8k):
    """A model without a reranker gets one: started from another checkpoint's,
    trained on cross-fitted train embeddings; the new checkpoint's encoder
    makes region tokens and its search reranks."""
    import numpy as np

    from retrieval.encoders import checkpoint, create_encoder

    refused = CliRunner().invoke(cli, ["retune-reranker", "xmr-lite2-open", "--dataset", str(flickr8k),
                                       "--out", str(tmp_path / "no")])
    assert refused.exit_code != 0 and "--reranker-from" in refused.output
    out = tmp_path / "open-rr"
    res = CliRunner().invoke(cli, ["retune-reranker", "xmr-lite2-open", "--reranker-from", "xmr-lite2",
                                   "--crossfit-folds", "2", "--captions-per-image", "1", "--dataset", str(flickr8k),
                                   "--out", str(out), "--limit", "24", "--pool", "16"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = checkpoint.read_config(out)
    assert meta["reranker_retune"]["crossfit_folds"] == 2
    assert meta["reranker_retune"]["options"]["captions_per_image"] == 1
    assert meta["wise_ft"] and meta["reranker"]  # the open model, now with a reranker
    enc = create_encoder(str(out), device="cpu")
    emb, tokens = enc.encode_images_with_tokens([np.zeros((enc.input_size, enc.input_size, 3), np.uint8)])
    assert tokens.shape == (1, *enc.token_shape)


def test_odd_file_names_print_one_line_each(tmp_path, mini_images):
    """A newline or tab in a file name is shown escaped in human output (one
    result per line); --json keeps the exact path."""
    import shutil

    photos = tmp_path / "odd"
    photos.mkdir()
    first, second = sorted(mini_images.iterdir())[:2]
    shutil.copy(first, photos / "two\nlines.jpg")
    shutil.copy(second, photos / "tab\there émoji 🐶.jpg")
    (photos / "empty\nfile.jpg").write_bytes(b"")
    idx = tmp_path / "index"
    res = run(["index", str(photos)], idx)
    assert "skipped " in res.output and "empty\\nfile.jpg: empty file" in res.output
    res = run(["search", "a person", "-k", "2", "--no-rerank"], idx)
    lines = res.output.strip().splitlines()
    assert len(lines) == 2, res.output
    assert any(line.endswith("two\\nlines.jpg") for line in lines)
    assert any(line.endswith("tab\\there émoji 🐶.jpg") for line in lines)
    hits = json.loads(run(["search", "a person", "-k", "2", "--no-rerank", "--json"], idx).output)
    assert {os.path.basename(h["path"]) for h in hits} == {"two\nlines.jpg", "tab\there émoji 🐶.jpg"}


def test_unusable_index_folders_give_one_line_errors(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = run(["index", str(tmp_path)], blocker / "index", ok=False)
    assert res.exit_code == 1 and "cannot create the index folder" in res.output and "Traceback" not in res.output
    from indexer.store import SCHEMA_VERSION
    from tests.conftest import index_store

    newer = tmp_path / "newer"
    index_store(newer, schema_version=SCHEMA_VERSION + 1, migrations={}).close()
    res = run(["status"], newer, ok=False)
    assert res.exit_code == 1 and "written by a newer xmr" in res.output and "Traceback" not in res.output


@pytest.mark.sqlite_only
def test_a_damaged_sqlite_file_is_left_as_it_was(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "xmr.db").write_text("garbage, not SQLite")
    res = run(["status"], bad, ok=False)
    assert res.exit_code == 1 and "damaged or not an xmr index" in res.output
    assert (bad / "xmr.db").read_text() == "garbage, not SQLite"  # left as it was


def test_a_database_damaged_after_opening_gives_one_line_error(tmp_path, mini_images, backend):
    idx = tmp_path / "index"
    run(["index", str(mini_images)], idx)
    for f in idx.glob("images.faiss*"):
        f.unlink()  # the next search must read the rows
    if backend == "postgresql":  # a table gone from under the index
        from tests.conftest import index_store

        store = index_store(idx)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE images")
        store.close()
        res = run(["search", "a dog"], idx, ok=False)
        assert res.exit_code == 1 and "the table images of this index is gone" in res.output, res.output
        assert "Traceback" not in res.output
        return
    import sqlite3

    db = idx / "xmr.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file
        images_page = con.execute("SELECT rootpage FROM sqlite_master WHERE name='images'").fetchone()[0]
        page = con.execute("PRAGMA page_size").fetchone()[0]
    raw = bytearray(db.read_bytes())
    start = (images_page - 1) * page
    raw[start : start + page] = os.urandom(page)  # the images table's root page
    db.write_bytes(bytes(raw))
    res = run(["search", "a dog"], idx, ok=False)
    assert res.exit_code == 1 and "index database failed" in res.output, res.output
    assert "Traceback" not in res.output


def test_serve_on_a_taken_port_says_so(tmp_path, mini_images):
    import socket

    idx = tmp_path / "index"
    run(["index", str(mini_images)], idx)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = run(["serve", "--port", str(port)], idx, ok=False)
    assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in res.output
    assert "xmr serving" not in res.output


def test_serve_answers_on_its_port(tmp_path, mini_images):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    idx = tmp_path / "index"
    run(["index", str(mini_images)], idx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from retrieval.cli import main; main()", "--index", str(idx),
                             "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=a+dog&k=3", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.3)
        assert body is not None and len(body) == 3
    finally:
        proc.terminate()
        proc.wait(10)
