"""What only a PostgreSQL index does: its folder remembers the server, the
writer lock is the server's advisory lock (two writer processes queue and
hand out distinct token slots), and a wrong database is refused in one line.
The rest of the suite runs on PostgreSQL too (tests marked ``databases``)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from indexer.database import RECORD_FILE, DatabaseChoiceError, locate
from retrieval.cli import cli
from retrieval.engine import Engine
from retrieval.errors import IndexUnusable
from tests.fakes import FakeEncoder


def _fake(tmp_path, url, **kw):
    return Engine.open(tmp_path / "index", create=True, reranker="none", encoder=FakeEncoder(), database=url, **kw)


def test_the_folder_remembers_the_server_without_its_password(tmp_path, postgres_url, monkeypatch):
    monkeypatch.delenv("XMR_DATABASE", raising=False)
    with_password = make_url(postgres_url).set(password="s3cret").render_as_string(hide_password=False)
    eng = _fake(tmp_path, with_password)  # trust authentication: the password is not checked
    assert eng.store.dialect == "postgresql" and "s3cret" not in eng.status()["database"]
    eng.close()
    record = (tmp_path / "index" / RECORD_FILE).read_text()
    assert "s3cret" not in record and json.loads(record)["schema"].startswith("xmr_")
    assert not (tmp_path / "index" / "xmr.db").exists()
    # later commands need not name it again; naming it again (with its password) is the same index
    again = Engine.open(tmp_path / "index", create=False, reranker="none", encoder=FakeEncoder())
    assert again.store.location.schema == eng.store.location.schema
    again.close()
    assert locate(tmp_path / "index", with_password, create=False).schema == eng.store.location.schema


def test_a_wrong_database_is_refused_in_one_line(tmp_path, postgres_url, monkeypatch):
    monkeypatch.delenv("XMR_DATABASE", raising=False)
    sqlite_index = Engine.open(tmp_path / "lite", create=True, reranker="none", encoder=FakeEncoder())
    sqlite_index.close()
    with pytest.raises(IndexUnusable, match="keeps its rows in SQLite"):
        Engine.open(tmp_path / "lite", reranker="none", encoder=FakeEncoder(), database=postgres_url)
    pg = _fake(tmp_path, postgres_url)
    pg.close()
    other = make_url(postgres_url).set(database="elsewhere").render_as_string(hide_password=False)
    with pytest.raises(IndexUnusable, match="keeps its rows in postgresql"):
        Engine.open(tmp_path / "index", reranker="none", encoder=FakeEncoder(), database=other)
    for bad in ("mysql://u@h/db", "not a url at all"):
        with pytest.raises(DatabaseChoiceError):
            locate(tmp_path / "new", bad, create=True)
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "cli"), "--database", "mysql://u@h/db", "status"])
    assert res.exit_code == 0  # no index there yet: status says so without touching a database
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "cli"), "--database", "mysql://u@h/db",
                                   "search", "a cat"])
    assert res.exit_code == 1 and "PostgreSQL" in res.output and "Traceback" not in res.output


def test_an_unreachable_server_leaves_the_folder_unbound(tmp_path, monkeypatch):
    monkeypatch.delenv("XMR_DATABASE", raising=False)
    with pytest.raises(IndexUnusable, match="server is running"):
        _fake(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    assert not (tmp_path / "index" / RECORD_FILE).exists()  # the next try may name another server
    _fake(tmp_path, "").close()  # and SQLite is still free to take the folder
    assert (tmp_path / "index" / "xmr.db").is_file()


def test_the_writer_lock_is_the_servers(tmp_path, postgres_url, monkeypatch):
    """The lock lives in PostgreSQL (a writer on another machine sees it),
    not in a file of the folder, and is gone when its holder's connection is."""
    monkeypatch.delenv("XMR_DATABASE", raising=False)
    a = _fake(tmp_path, postgres_url)
    b = Engine.open(tmp_path / "index", reranker="none", encoder=FakeEncoder())
    with a._lock.hold() as held:
        assert held and not (tmp_path / "index" / "write.lock").exists()
        with b._lock.hold(wait=False) as other:
            assert other is False
        assert "PostgreSQL backend pid" in b._lock.holder()
    with b._lock.hold(wait=False) as other:
        assert other is True
    # a holder that dies (its connection closed) frees the lock
    code = (f"from retrieval.engine import Engine; from tests.fakes import FakeEncoder; import os;"
            f"e = Engine.open({str(tmp_path / 'index')!r}, reranker='none', encoder=FakeEncoder());"
            "e._lock.hold().__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    with b._lock.hold(wait=False) as free:
        assert free is True
    a.close()
    b.close()


@pytest.mark.slow
def test_two_writer_processes_share_one_index(tmp_path, mini_images, postgres_url, monkeypatch):
    """Two `xmr index` runs on one PostgreSQL index at once: the second waits
    for the first; every image lands once, with a token slot of its own."""
    monkeypatch.setenv("XMR_DATABASE", postgres_url)
    halves = [tmp_path / "a", tmp_path / "b"]
    for h in halves:
        h.mkdir()
    for i, f in enumerate(sorted(mini_images.iterdir())):
        shutil.move(f, halves[i % 2] / f.name)
    idx = tmp_path / "index"
    cmd = [sys.executable, "-m", "retrieval.cli", "--index", str(idx), "index", "-q", "--batch-size", "4",
           "--model", "xmr-lite2"]
    # the first creates the index (its schema and the folder's record) before the race starts
    (tmp_path / "empty").mkdir()
    subprocess.run(cmd + [str(tmp_path / "empty")], capture_output=True, check=True)
    procs = [subprocess.Popen(cmd + [str(h)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for h in halves]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-800:] for o in outs]
    assert any(b"waiting for it to finish" in err for _, err in outs)
    eng = Engine.open(idx, reranker="none")
    ids, slots = eng.store.live_token_slots()
    assert eng.store.count_images() == 32 == len(ids) and len(set(slots.tolist())) == 32
    info = eng.status()["token_store"]
    assert info["slots"] == 32 and "problem" not in info  # no slot written twice or skipped
    tokens = eng._tokens(ids.tolist())  # every slot reads back whole (checksums)
    assert len(tokens) == 32 and all(np.isfinite(t).all() for t in tokens.values())
    eng.close()


def test_scratch_indexes_stay_in_sqlite_whatever_xmr_database_says(tmp_path, monkeypatch):
    """`xmr eval` and the zero-shot benchmark index into a temporary folder:
    with XMR_DATABASE set, that must not leave schemas behind on the server."""
    from retrieval.evaluation import temporary_engine

    monkeypatch.setenv("XMR_DATABASE", "postgresql://nobody@127.0.0.1:1/none")  # unreachable: touching it fails
    engine = temporary_engine(str(tmp_path), None, [0])
    assert engine.store.dialect == "sqlite" and (tmp_path / "index" / "xmr.db").is_file()
    engine.close()
