import numpy as np
import pytest

from indexer.store import Store, StoreError
from retrieval.captions import read_caption_file
from retrieval.errors import CaptionFileError


def test_migrations_run_in_order(tmp_path):
    db = tmp_path / "x.db"
    Store(db).close()
    calls = []

    def m1(conn):
        calls.append(1)

    def m2(conn):
        calls.append(2)

    Store(db, schema_version=3, migrations={1: m1, 2: m2}).close()
    assert calls == [1, 2]
    assert Store(db, schema_version=3, migrations={}).get_meta()["schema_version"] == "3"
    with pytest.raises(StoreError, match="newer"):
        Store(db, schema_version=2)


def test_write_is_atomic_per_batch(tmp_path):
    st = Store(tmp_path / "x.db")
    row = dict(path="/a.jpg", size=1, mtime_ns=1, sha256="h", width=2, height=2, embedding=np.ones(4, np.float32))
    bad = dict(row, path="/b.jpg", width=None)  # violates NOT NULL
    with pytest.raises(Exception):
        st.write_images([row, bad], [], [], [])
    assert st.count_images() == 0  # neither row landed
    st.write_images([row], [], [], [])
    assert st.count_images() == 1 and st.generation("images") == 1


def test_flickr_token_file_with_malformed_lines(tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("a.jpg#0\tA dog runs .\nno tab here\nb.jpg#1\t   \n\nc.jpg#0\tA cat sleeps .\n")
    bad = []
    pairs = read_caption_file(f, on_bad=lambda n, r: bad.append(n))
    assert pairs == [("a.jpg", "A dog runs ."), ("c.jpg", "A cat sleeps .")]
    assert bad == [2, 3]


def test_karpathy_json_and_errors(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"images": [{"filename": "x.jpg", "sentences": [{"raw": "a red car"}, {"raw": ""}]}]}')
    assert read_caption_file(f) == [("x.jpg", "a red car")]
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
    from indexer.tokens import TokenStore

    ts = TokenStore(tmp_path, (3, 4))
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    assert ts.append(a) == [0, 1]
    np.testing.assert_array_equal(ts.get([1, 0]), a[::-1])
    with open(ts.path, "ab") as f:  # a killed run's half-written slot
        f.write(b"\x00" * 7)
    assert ts.append(a[:1]) == [2]
    np.testing.assert_array_equal(ts.get([2]), a[:1])
    with pytest.raises(ValueError):
        TokenStore(tmp_path, (3, 5))
    with pytest.raises(KeyError):
        ts.get([9])
