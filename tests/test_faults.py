"""Fault scenarios, each on the real engine and real files: a file swapped for
a symlink, unreadable and empty folders, a damaged token store and sidecar, a
full disk, bad CSV columns, odd inputs, and concurrent searches. After each
one the index is complete: its row count, FAISS rows = store rows, and a
search that works."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from retrieval import engine as engine_mod
from retrieval.cli import cli
from retrieval.engine import Engine
from retrieval.server import create_app

from .conftest import make_image
from .fakes import COLORS, TokenEncoder, TokenReranker

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases

SHADES = {f"{name}{i}": tuple(max(0, min(255, c + 12 * i)) for c in rgb)
          for name, rgb in COLORS.items() for i in range(3)}


@pytest.fixture
def photos(tmp_path) -> Path:
    """12 images: 3 at the top, 3 in each of sub/, other/ and deep/er/."""
    root = tmp_path / "photos"
    folders = ["", "sub", "other", "deep/er"]
    for n, (name, color) in enumerate(SHADES.items()):
        make_image(root / folders[n % 4] / f"{name}.jpg", color)
    return root


def open_engine(tmp_path, reranker=None, encoder=None) -> Engine:
    eng = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=encoder or TokenEncoder())
    eng.reranker = reranker
    return eng


def assert_complete(eng: Engine, n: int) -> None:
    """The index holds ``n`` images, FAISS agrees with the store, SQLite is
    intact and a search answers."""
    assert eng.store.count_images() == n
    assert eng._index("images").ntotal == n
    with eng.store.engine.connect() as conn:
        if eng.store.dialect == "sqlite":
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        else:  # PostgreSQL checks its own pages; every row is whole
            assert conn.exec_driver_sql(f"SELECT count(*) FROM images WHERE length(embedding) <> {4 * eng.encoder.dim}"
                                        ).scalar() == 0
    if n:
        assert len(eng.search("red", k=min(3, n))) == min(3, n)


def cli_run(index_dir, *args):
    return CliRunner().invoke(cli, ["--index", str(index_dir), *[str(a) for a in args]])


@pytest.fixture
def fake_model(monkeypatch):
    """`--model fake` on the command line builds a TokenEncoder with a TokenReranker."""
    monkeypatch.setattr(engine_mod, "create_encoder", lambda name, device=None: TokenEncoder())
    monkeypatch.setattr(engine_mod, "_own_reranker", lambda enc: TokenReranker())


# -- 1. the server never serves a file other than the one indexed ---------------

def test_server_refuses_a_file_swapped_for_a_symlink(tmp_path, photos):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    eng = open_engine(tmp_path)
    eng.index([photos])
    client = TestClient(create_app(eng))
    rows = {os.path.basename(p): i for i, p, _ in eng.store.iter_rows_under([str(photos)])}
    at = {p.name: p for p in photos.rglob("*.jpg")}
    victim, other, kept = at["red0.jpg"], at["red1.jpg"], at["red2.jpg"]
    ok = client.get(f"/api/image/{rows['red2.jpg']}")
    assert ok.status_code == 200 and ok.content == kept.read_bytes()
    assert ok.headers["content-type"] == "image/jpeg"
    victim.unlink()
    victim.symlink_to(secret)
    for route in ("image", "thumb"):
        r = client.get(f"/api/{route}/{rows['red0.jpg']}")
        assert r.status_code == 404 and "changed since it was indexed" in r.json()["error"]
        assert "root:x" not in r.text
    # another image in its place: not what was indexed either
    shutil.copy(at["blue0.jpg"], other)
    assert client.get(f"/api/image/{rows['red1.jpg']}").status_code == 404
    # an indexed file that is itself a symlink is served while its target is unchanged
    link = photos / "link" / "green.jpg"
    link.parent.mkdir()
    link.symlink_to(at["green0.jpg"])
    eng.index([photos / "link"])
    link_id = next(iter(eng.store.iter_rows_under([str(photos / "link")])))[0]
    r = client.get(f"/api/image/{link_id}")
    assert r.status_code == 200 and r.content == at["green0.jpg"].read_bytes()
    # a FIFO in the file's place does not hang the server
    at["white0.jpg"].unlink()
    os.mkfifo(at["white0.jpg"])
    assert client.get(f"/api/image/{rows['white0.jpg']}").status_code == 404


# -- 2. folders that are unreadable, empty or missing keep their images ----------

def test_unreadable_folder_keeps_its_images(tmp_path, photos, monkeypatch):
    eng = open_engine(tmp_path)
    assert eng.index([photos]).added == 12
    sub = str(photos / "sub")
    # what a folder without permission (or an unreachable mount) looks like: its
    # files cannot be listed or opened
    moved_away = tmp_path / "hidden"
    shutil.move(sub, moved_away)
    os.mkdir(sub)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == sub:
            raise PermissionError(errno.EACCES, "Permission denied", sub)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped = []
    s = eng.index([photos], on_skip=lambda p, r: skipped.append((p, r)))
    assert (sub, "unreadable folder (Permission denied)") in skipped
    assert s.removed == 0 and dict(s.offline) == {sub: 3}
    assert_complete(eng, 12)
    monkeypatch.setattr(os, "scandir", real_scandir)
    os.rmdir(sub)
    shutil.move(moved_away, sub)  # access comes back: nothing to embed again
    s = eng.index([photos])
    assert (s.added, s.removed, s.unchanged, sum(s.offline.values())) == (0, 0, 12, 0)
    assert_complete(eng, 12)


def test_empty_mount_point_and_missing_root_keep_their_images_until_pruned(tmp_path, photos, fake_model):
    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    # an unmounted drive: the mount point is an empty folder
    for f in (photos / "deep" / "er").iterdir():
        f.unlink()
    res = cli_run(index, "index", photos)
    assert res.exit_code == 0, res.output
    assert "removed 0" in res.output and "offline: kept 3 images" in res.output and "--prune" in res.output
    # the whole root gone (a network share not mounted): kept, and not an error
    gone = tmp_path / "gone"
    shutil.move(photos, gone)
    res = cli_run(index, "index", photos)
    assert res.exit_code == 0 and "offline: kept 12 images" in res.output, res.output
    eng = open_engine(tmp_path)
    assert_complete(eng, 12)
    shutil.move(gone, photos)
    # files deleted from a folder that still holds images do leave the index
    (photos / "sub" / os.listdir(photos / "sub")[0]).unlink()
    res = cli_run(index, "index", photos)
    assert "removed 1" in res.output and "offline: kept 3 images" in res.output
    res = cli_run(index, "index", "--prune", photos)
    assert res.exit_code == 0 and "removed 3" in res.output and "offline" not in res.output
    assert_complete(open_engine(tmp_path), 8)


def test_a_moved_folder_is_a_move_not_offline(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    embedded = eng.encoder.images_embedded
    os.rename(photos / "sub", photos / "renamed")
    s = eng.index([photos])
    assert (s.moved, s.removed, sum(s.offline.values())) == (3, 0, 0), s
    assert eng.encoder.images_embedded == embedded
    assert_complete(eng, 12)


def test_index_of_a_path_that_does_not_exist_fails(tmp_path, fake_model):
    res = cli_run(tmp_path / "index", "index", "--model", "fake", tmp_path / "no" / "such" / "dir")
    assert res.exit_code != 0 and "no such file or folder" in res.output
    assert "Traceback" not in res.output


# -- 3/4. the token store verifies itself and is rebuilt -------------------------

def _damage(idx: Path, how: str) -> None:
    tokens = idx / "tokens.f16"
    if how == "missing":
        tokens.unlink()
    elif how == "truncated":
        os.truncate(tokens, tokens.stat().st_size // 3)
    elif how == "zeroed":
        tokens.write_bytes(b"\0" * tokens.stat().st_size)


def test_a_reranker_that_does_not_pay_is_skipped_unless_asked_for(tmp_path, photos):
    """A reranker whose default depth is 0 (it measured no gain over recall)
    costs nothing by default; an explicit --rerank-k still uses it."""
    rr = TokenReranker(default_k=0)
    eng = open_engine(tmp_path, rr)
    eng.index([photos])
    assert not any(h.reranked for h in eng.search("green", k=5)) and rr.calls == 0
    assert all(h.reranked for h in eng.search("green", k=5, rerank_k=5)) and rr.calls == 1
    assert not any(h.reranked for h in eng.search("green", k=5, rerank_k=5, rerank=False))
    eng.reranker = TokenReranker()
    assert all(h.reranked for h in eng.search("green", k=5))  # the usual default: 20


@pytest.mark.parametrize("how", ["missing", "truncated", "zeroed"])
def test_damaged_token_store_falls_back_then_is_rebuilt(tmp_path, photos, how, caplog):
    rr = TokenReranker()
    eng = open_engine(tmp_path, rr)
    eng.index([photos])
    before = eng.search("green", k=5)
    assert all(h.reranked for h in before)
    _damage(tmp_path / "index", how)
    reader = open_engine(tmp_path, TokenReranker())  # another process: a search, or the server
    with caplog.at_level(logging.WARNING, logger="retrieval.engine"):
        hits = reader.search("green", k=5)
    assert len(hits) == 5 and not any(h.reranked for h in hits)
    assert "region tokens damaged" in caplog.text and "xmr index" in caplog.text
    client = TestClient(create_app(reader))
    assert client.get("/api/search", params={"q": "green"}).status_code == 200
    if how != "zeroed":  # a length problem shows in status without reading the file
        assert "problem" in reader.status()["token_store"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrieval.engine"):
        s = eng.index([photos])
    assert "damaged" in caplog.text
    assert s.updated > 0 and s.removed == 0
    assert_complete(eng, 12)
    fresh = open_engine(tmp_path, TokenReranker())
    assert "problem" not in fresh.status()["token_store"]
    after = fresh.search("green", k=5)
    assert all(h.reranked for h in after)
    assert [h.path for h in after] == [h.path for h in before]  # same images, same tokens: same order


def test_damaged_tokens_of_a_query_image_are_made_again(tmp_path, photos):
    eng = open_engine(tmp_path, TokenReranker())
    eng.index([photos])
    (tmp_path / "captions.txt").write_text("a red photo\na green photo\na blue photo\n")
    eng.import_captions(tmp_path / "captions.txt")
    green = next(photos.rglob("green0.jpg"))
    want = [h.caption for h in eng.caption(green, k=3)]
    _damage(tmp_path / "index", "zeroed")
    got = open_engine(tmp_path, TokenReranker()).caption(green, k=3)
    assert [h.caption for h in got] == want and all(h.reranked for h in got)


def test_garbage_token_sidecar_is_rewritten(tmp_path, photos, fake_model):
    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    (index / "tokens.json").write_bytes(b"\x89garbage{{{")
    for args in (["search", "red"], ["status"], ["index", photos]):
        res = cli_run(index, *args)
        assert res.exit_code == 0 and "Traceback" not in res.output, (args, res.output)
    assert json.loads((index / "tokens.json").read_text())["shape"] == [2, 4]
    assert_complete(open_engine(tmp_path), 12)


# -- 5. a full disk ends in one line, with nothing half-written ------------------

@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 2 MB tmpfs where the machine allows mounting one (root
    on Linux), else None."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` but for about ``leave`` bytes."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_full_disk_during_index_is_one_line_and_loses_nothing(tmp_path, small_disk, fake_model, monkeypatch, backend):
    many = tmp_path / "many"
    for i in range(160):
        make_image(many / f"{i:03d}.png", (i, 255 - i, (7 * i) % 255), size=(48, 36))
    first = tmp_path / "first"
    first.mkdir()
    for f in sorted(many.iterdir())[:10]:
        shutil.copy(f, first / f.name)
    index = (small_disk or tmp_path) / "index"
    assert cli_run(index, "index", "--model", "fake", first).exit_code == 0
    filler = None
    if small_disk is not None and backend == "sqlite":
        filler = _fill(small_disk, 24 * 1024)
    else:  # inject what a full disk does to the token file (with PostgreSQL, the rows are not on this disk)
        from indexer import tokens as tokens_mod

        real_append = tokens_mod.TokenStore.append
        calls = [0]

        def append(self, toks):
            calls[0] += 1
            if calls[0] == 3:
                with open(self.path, "ab") as f:
                    f.write(b"\1" * 100)  # a torn write, then the error
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            return real_append(self, toks)

        monkeypatch.setattr(tokens_mod.TokenStore, "append", append)
    res = cli_run(index, "index", "--batch-size", "16", many)
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert "Traceback" not in res.output and last.startswith("Error: ")
    assert ("No space left" in last or "disk is full" in last) and "free some space" in last
    assert [p.name for p in index.iterdir() if ".tmp" in p.name] == []
    if filler is not None:
        filler.unlink()  # space comes back
    else:
        monkeypatch.setattr(tokens_mod.TokenStore, "append", real_append)
    eng = Engine.open(index, create=False, reranker="none", encoder=TokenEncoder())
    n = eng.store.count_images()
    assert 10 <= n < 170
    _ids, slots = eng.store.live_token_slots()
    assert eng.tokens.check(slots) == []  # every row's tokens are whole
    assert_complete(eng, n)
    res = cli_run(index, "index", many)
    assert res.exit_code == 0, res.output
    assert_complete(Engine.open(index, create=False, reranker="none", encoder=TokenEncoder()), 170)


def test_faiss_write_error_during_a_search_is_not_fatal(tmp_path, photos, monkeypatch, caplog):
    import faiss

    eng = open_engine(tmp_path)
    eng.index([photos])
    (tmp_path / "index" / "images.faiss").unlink()  # the next search rebuilds it and writes it back

    def full(index, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("Error in faiss::FileIOWriter: write error")

    monkeypatch.setattr(faiss, "write_index", full)
    reader = open_engine(tmp_path)
    with caplog.at_level(logging.WARNING, logger="retrieval.engine"):
        assert len(reader.search("red", k=3)) == 3
    assert "not saved" in caplog.text
    assert [p.name for p in (tmp_path / "index").iterdir() if ".tmp" in p.name] == []


def test_full_disk_during_caption_import_says_so(tmp_path, photos, fake_model, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from indexer.store import Store

    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"caption number {i}\n" for i in range(600)))
    real = Store.add_captions
    calls = [0]

    def add(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "add_captions", add)
    res = cli_run(index, "captions", "import", caps)
    assert res.exit_code == 1 and "disk" in res.output and "free some space" in res.output
    assert "move the index folder aside" not in res.output
    monkeypatch.setattr(Store, "add_captions", real)
    res = cli_run(index, "captions", "import", caps)
    assert res.exit_code == 0 and "imported 344 captions (256 already there" in res.output, res.output


# -- 6. CSV files with the wrong columns -----------------------------------------

def test_csv_with_wrong_columns_imports_no_junk(tmp_path, photos):
    eng = open_engine(tmp_path)
    f = tmp_path / "caps.csv"
    f.write_text("filename,text\n"
                 "a.jpg,a dog on the grass\n"
                 "foo,bar,baz\n"
                 "b.jpg,\"a cat, asleep\"\n"
                 "c.jpg,a bird,2,5\n"
                 "lonely\n")
    bad = []
    result = eng.import_captions(f, on_bad=lambda where, reason: bad.append((where, reason)))
    texts = sorted(r.text for r in eng.store.caption_rows(range(1, 100)).values())
    assert texts == ["a cat, asleep", "a dog on the grass"]
    assert result["malformed"] == 3 and [w for w, _ in bad] == ["line 3", "line 5", "line 6"]
    assert "found 3" in bad[0][1] and "double quotes" in bad[0][1]


def test_invalid_utf8_is_counted(tmp_path, photos, fake_model):
    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    f = tmp_path / "latin1.txt"
    f.write_bytes("un caf\u00e9 au bord de l'eau\nplain ascii caption\n".encode("latin-1"))
    res = cli_run(index, "captions", "import", f)
    assert res.exit_code == 0 and "imported 2 captions" in res.output
    assert "1 captions of" in res.output and "not UTF-8" in res.output


# -- 7. small things: vanished files, FIFOs, empty queries -----------------------

def test_file_deleted_between_walk_and_read_is_vanished(tmp_path):
    from indexer.pipeline import examine
    from indexer.walk import FoundFile

    from .fakes import fake_prepare

    r = examine(FoundFile(str(tmp_path / "gone.jpg"), 100, 0), None, frozenset(), None, fake_prepare)
    assert r.reason == "vanished"


def test_query_image_that_is_a_fifo_is_refused(tmp_path, photos, fake_model):
    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for cmd in ("similar", "caption"):
        if cmd == "caption":
            (tmp_path / "c.txt").write_text("a red thing\n")
            cli_run(index, "captions", "import", tmp_path / "c.txt")
        res = cli_run(index, cmd, fifo)
        assert res.exit_code == 1 and "not a regular file" in res.output, res.output


@pytest.mark.parametrize("q", ["\x00", " ", "\x1b\x07", "\t\n"])
def test_empty_queries_are_refused_alike(tmp_path, photos, q):
    eng = open_engine(tmp_path)
    eng.index([photos])
    r = TestClient(create_app(eng)).get("/api/search", params={"q": q})
    assert r.status_code == 400 and "query is empty" in r.json()["error"]


# -- 8. searches in parallel -----------------------------------------------------

def test_concurrent_searches_match_serial_ones(tmp_path, photos):
    eng = open_engine(tmp_path, TokenReranker())
    eng.index([photos])
    queries = [f"{c} {w}" for c in COLORS for w in ("photo", "thing", "picture")]
    want = {q: [(h.id, round(h.score, 5)) for h in eng.search(q, k=5)] for q in queries}
    got, errors = {}, []

    def worker(qs):
        try:
            for q in qs:
                got[q] = [(h.id, round(h.score, 5)) for h in eng.search(q, k=5)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(queries[i::6],)) for i in range(6)]
    # a writer in the same process meanwhile: journal replay under the read/write lock
    make_image(photos / "late" / "late.jpg", (250, 10, 10))
    for t in threads:
        t.start()
    eng.index([photos / "late"])
    for t in threads:
        t.join()
    assert errors == []
    assert set(got) == set(want)
    late = next(iter(eng.store.iter_rows_under([str(photos / "late")])))[0]
    for q in queries:  # each answer is the serial one, or the serial one with the late image in it
        assert [i for i, _ in got[q] if i != late][:4] == [i for i, _ in want[q] if i != late][:4]
    assert_complete(eng, 13)


def test_fake_model_is_used_by_the_cli(tmp_path, photos, fake_model):
    """The CLI scenarios above run the fake model end to end."""
    index = tmp_path / "index"
    assert cli_run(index, "index", "--model", "fake", photos).exit_code == 0
    res = cli_run(index, "search", "red", "-k", "2")
    assert res.exit_code == 0 and res.output.count("*") == 2
