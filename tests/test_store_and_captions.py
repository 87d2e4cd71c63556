import numpy as np
import pytest

from indexer.store import Store, StoreError
from retrieval.captions import read_caption_file
from retrieval.errors import CaptionFileError

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


def test_migrations_run_in_order(store_at):
    db = store_at()
    Store(db, schema_version=2).close()
    calls = []

    def m2(conn):
        calls.append(2)

    def m3(conn):
        calls.append(3)

    Store(db, schema_version=4, migrations={2: m2, 3: m3}).close()
    assert calls == [2, 3]
    assert Store(db, schema_version=4, migrations={}).get_meta()["schema_version"] == "4"
    with pytest.raises(StoreError, match="newer"):
        Store(db, schema_version=2)


def test_schema_2_index_opens_as_current(store_at):
    from indexer.store import SCHEMA_VERSION

    db = store_at()
    Store(db, schema_version=2).close()
    assert SCHEMA_VERSION == 4 and Store(db).get_meta()["schema_version"] == "4"


V1_SCHEMA = """
CREATE TABLE images (id INTEGER PRIMARY KEY, path VARCHAR UNIQUE NOT NULL, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, sha256 VARCHAR(64) NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
  added_at FLOAT NOT NULL, embedding BLOB NOT NULL, token_slot INTEGER);
CREATE TABLE captions (id INTEGER PRIMARY KEY, text VARCHAR NOT NULL, source VARCHAR NOT NULL,
  image_name VARCHAR, embedding BLOB NOT NULL);
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('generation_images', '3');
"""


@pytest.mark.sqlite_only
def test_a_schema_1_index_is_migrated_without_losing_rows(tmp_path):
    import sqlite3

    db = tmp_path / "x.db"
    con = sqlite3.connect(db)
    con.executescript(V1_SCHEMA)
    vec = np.arange(4, dtype=np.float32)
    con.execute("INSERT INTO images VALUES (7, '/p/a.jpg', 1, 1, 'h', 2, 2, 0.0, ?, NULL)", (vec.tobytes(),))
    con.execute("INSERT INTO captions VALUES (1, 'a dog', 's', 'a.jpg', ?)", (vec.tobytes(),))
    con.commit()
    con.close()
    st = Store(db)
    assert st.get_meta()["schema_version"] == "4"
    ids, vecs, bias = next(st.iter_vectors("images", 4))
    assert ids.tolist() == [7] and np.array_equal(vecs[0], vec) and np.isnan(bias[0])
    assert next(st.iter_vectors("captions", 4))[0].tolist() == [1]
    # the journal starts empty, so an index saved before the migration can still catch up from here
    assert st.changes("images", 3, 3) == ([], [])
    new = st.write_images([dict(path="/p/b.jpg", size=1, mtime_ns=1, sha256="g", width=2, height=2,
                                embedding=vec, bias=0.5)], [], [], [])
    assert st.changes("images", 3, st.generation("images")) == (new, new)
    assert next(st.iter_vectors("images", 4, ids=new))[2].tolist() == [0.5]


def test_journal_reports_net_changes_and_forgets_after_pruning(store_at):
    st = Store(store_at())
    row = dict(size=1, mtime_ns=1, sha256="h", width=2, height=2, embedding=np.ones(4, np.float32))
    a = st.write_images([dict(row, path="/a.jpg"), dict(row, path="/b.jpg")], [], [], [])
    g1 = st.generation("images")
    b2 = st.write_images([dict(row, path="/b.jpg", sha256="new")], [], [], [a[0]])  # replace b, remove a
    g2 = st.generation("images")
    added, touched = st.changes("images", g1, g2)
    assert added == b2 and set(touched) == {a[0], a[1], b2[0]}
    assert st.changes("images", 0, g1) == (a, a)
    st.prune_changes("images", g1)
    assert st.changes("images", 0, g2) is None  # the journal no longer reaches back
    assert st.changes("images", g1, g2)[0] == b2


def test_write_is_atomic_per_batch(store_at):
    st = Store(store_at())
    row = dict(path="/a.jpg", size=1, mtime_ns=1, sha256="h", width=2, height=2, embedding=np.ones(4, np.float32))
    bad = dict(row, path="/b.jpg", width=None)  # violates NOT NULL
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        st.write_images([row, bad], [], [], [])
    assert st.count_images() == 0  # neither row landed
    st.write_images([row], [], [], [])
    assert st.count_images() == 1 and st.generation("images") == 1


def test_rows_under_thousands_of_paths(store_at):
    """`xmr index *.jpg` hands over every file as a root: thousands of
    prefixes must not make one SQL expression too deep for SQLite."""
    st = Store(store_at())
    row = dict(size=1, mtime_ns=1, sha256="h", width=2, height=2, embedding=np.ones(4, np.float32))
    st.write_images([dict(row, path=f"/p/img{i:04d}.jpg") for i in range(1500)]
                    + [dict(row, path="/p/sub/a.jpg"), dict(row, path="/p-other/b.jpg")], [], [], [])
    asked = [f"/p/img{i:04d}.jpg" for i in range(0, 1500, 2)] + ["/p/sub", "/p/sub/a.jpg", "/p/img0000.jpg"]
    got = [path for _, path, _ in st.iter_rows_under(asked)]
    assert len(got) == len(set(got)) == 751  # each row once, nested and repeated roots folded
    assert "/p/sub/a.jpg" in got and "/p/img0001.jpg" not in got and "/p-other/b.jpg" not in got
    assert st.remove_paths(asked) == 751 and st.count_images() == 751


def test_bulk_writes_return_each_row_its_own_id(store_at):
    """Images and captions go in with one INSERT a batch; the ids returned
    follow the order of the rows given (the journal and callers rely on it)."""
    st = Store(store_at())
    row = dict(size=1, mtime_ns=1, sha256="h", width=2, height=2)
    st.write_images([dict(row, path="/first.jpg", embedding=np.zeros(4, np.float32))], [], [], [])
    paths = [f"/p/{i:03d}.jpg" for i in range(300)][::-1]
    ids = st.write_images([dict(row, path=p, embedding=np.full(4, i, np.float32), token_slot=i, bias=i / 10)
                           for i, p in enumerate(paths)], [], [], [])
    rows = st.image_rows(ids)
    assert len(set(ids)) == 300 and [rows[i].path for i in ids] == paths
    assert [rows[i].token_slot for i in ids] == list(range(300)) and rows[ids[7]].bias == pytest.approx(0.7)
    assert st.add_captions([("a.jpg", "one"), (None, "two")], np.eye(2, 4, dtype=np.float32), "src.txt",
                           np.array([0.1, 0.2])) == 2
    got = {r.text: r for r in st.caption_rows(st.changes("captions", 0, st.generation("captions"))[0]).values()}
    assert got["one"].image_name == "a.jpg" and got["two"].image_name is None
    assert got["two"].bias == pytest.approx(0.2, abs=1e-6)


def test_flickr_token_file_with_malformed_lines(tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("a.jpg#0\tA dog runs .\nno tab here\nb.jpg#1\t   \n\nc.jpg#0\tA cat sleeps .\n"
                 "d.jpg#0\t" + "word " * 300 + "\n")
    bad = []
    pairs = read_caption_file(f, on_bad=lambda where, why: bad.append((where, why)))
    assert pairs == [("a.jpg", "A dog runs ."), ("c.jpg", "A cat sleeps .")]
    assert bad == [("line 2", "expected '<image>#<n><TAB><caption>'"), ("line 3", "empty caption"),
                   ("line 6", "caption longer than 1000 characters")]


def test_karpathy_json_and_errors(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"images": [{"filename": "x.jpg", "sentences": [{"raw": "a red car"}, {"raw": ""}]}]}')
    bad = []
    assert read_caption_file(f, on_bad=lambda where, why: bad.append((where, why))) == [("x.jpg", "a red car")]
    assert bad == [("images[0] (x.jpg)", "empty caption")]
    f.write_text('{"nope": 1}')
    with pytest.raises(CaptionFileError, match="Karpathy"):
        read_caption_file(f)
    b = tmp_path / "bin.txt"
    b.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(CaptionFileError, match="binary"):
        read_caption_file(b)
    with pytest.raises(CaptionFileError, match="cannot read"):
        read_caption_file(tmp_path / "missing.txt")


def test_token_store_append_get_and_torn_write(tmp_path):
    from indexer.tokens import TokenShapeMismatch, TokenStore, TokenStoreDamaged

    ts = TokenStore(tmp_path, (3, 4))
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    assert ts.append(a) == [0, 1]
    np.testing.assert_array_equal(ts.get([1, 0]), a[::-1])
    with open(ts.path, "ab") as f:  # a killed run's half-written slot
        f.write(b"\x00" * 7)
    assert ts.append(a[:1]) == [2]
    np.testing.assert_array_equal(ts.get([2]), a[:1])
    with pytest.raises(TokenShapeMismatch):
        TokenStore(tmp_path, (3, 5))
    with pytest.raises(TokenStoreDamaged):
        ts.get([9])


def test_karpathy_json_is_streamed_across_any_chunk_boundary(tmp_path, monkeypatch):
    import json

    import retrieval.captions as captions

    doc = {"dataset": {"name": "x", "sizes": [1, 22, 333]}, "version": 1.25,
           "images": [{"filename": f"im{i}.jpg", "split": "test", "imgid": 10 ** i,
                       "sentences": [{"raw": f"caption {i} {j} \u00e9t\u00e9", "tokens": ["a"]} for j in range(2)]}
                      for i in range(6)],
           "tail": None}
    f = tmp_path / "d.json"
    f.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    want = [(f"im{i}.jpg", f"caption {i} {j} \u00e9t\u00e9") for i in range(6) for j in range(2)]
    for size in (1, 2, 3, 7, 64, 1 << 20):  # every value split at some boundary, numbers included
        monkeypatch.setattr(captions, "_READ_CHUNK", size)
        assert read_caption_file(f) == want, size
    monkeypatch.setattr(captions, "_READ_CHUNK", 5)
    f.write_text('{"images": []}')
    assert read_caption_file(f) == []
    for broken, why in [('{"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}', "expected"),
                        ('{"images": [{"filename": "a.jpg"}] } trailing', "extra data"),
                        ('{"dataset": "flickr"}', "images"), ('["images"]', "expected"), ("", "expected")]:
        f.write_text(broken)
        with pytest.raises(CaptionFileError, match=why):
            read_caption_file(f)


def test_line_formats_stream_with_any_line_ending(tmp_path, monkeypatch):
    import retrieval.captions as captions

    monkeypatch.setattr(captions, "_READ_CHUNK", 3)
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffa red car\r\nblue sky\rgreen grass\n\nlast one".encode())
    assert read_caption_file(f, "text") == [(None, c) for c in ("a red car", "blue sky", "green grass", "last one")]
    f.write_bytes(b'image,caption\r\na.jpg,"two\r\nlines"\r\nb.jpg,plain\r\n')
    assert read_caption_file(f, "csv") == [("a.jpg", "two lines"), ("b.jpg", "plain")]
    f.write_bytes(b"a.jpg#0\tA dog .\r\nb.jpg#1\tA cat .")
    assert read_caption_file(f) == [("a.jpg", "A dog ."), ("b.jpg", "A cat .")]
    monkeypatch.setattr(captions, "MAX_LINE_CHARS", 50)
    f.write_text("x" * 200)
    with pytest.raises(CaptionFileError, match="line longer"):
        read_caption_file(f)
    f.write_bytes(b"fine line\n" * 5 + b"\x00\x01 binary later")
    with pytest.raises(CaptionFileError, match="binary"):
        read_caption_file(f)


@pytest.mark.sqlite_only
def test_schema_3_index_gets_the_duplicate_check_index(tmp_path):
    import sqlite3

    db = tmp_path / "x.db"
    Store(db, schema_version=3, migrations={}).close()
    con = sqlite3.connect(db)  # as schema 3 made it: captions indexed by source alone
    con.execute("DROP INDEX ix_captions_source_text")
    con.execute("CREATE INDEX ix_captions_source ON captions (source)")
    con.commit()
    con.close()
    st = Store(db)
    st.add_captions([("a.jpg", "one"), (None, "two")], np.eye(2, 4, dtype=np.float32), "src.txt")
    assert st.new_captions("src.txt", [("a.jpg", "one"), ("b.jpg", "one"), (None, "two"), ("b.jpg", "one")]) \
        == [("b.jpg", "one")]
    assert st.new_captions("other.txt", [(None, "two")]) == [(None, "two")]
    st.close()
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    plan = " ".join(r[-1] for r in con.execute(
        "EXPLAIN QUERY PLAN SELECT image_name, text FROM captions WHERE source = 's' AND text IN ('a', 'b')"))
    con.close()
    assert "ix_captions_source_text" in names and "ix_captions_source" not in names
    assert "ix_captions_source_text" in plan


def test_binary_without_nul_bytes_is_refused_and_legacy_text_is_not(tmp_path):
    rng = np.random.default_rng(0)
    noise = bytes(b for b in rng.integers(1, 256, 4000, dtype=np.uint8).tolist())  # no NUL byte at all
    f = tmp_path / "photo.txt"
    f.write_bytes(noise)
    with pytest.raises(CaptionFileError, match="binary"):
        read_caption_file(f)
    f.write_bytes("un caf\u00e9 au bord de la rivi\u00e8re, deux enfants jouent dans l'\u00e9t\u00e9\n".encode("latin-1") * 20)
    got = read_caption_file(f)
    assert len(got) == 20 and got[0][1].startswith("un caf\ufffd au bord")
