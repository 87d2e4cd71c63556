"""Engine behaviour with a fake encoder: incremental indexing, bad input,
filters, model checks. Fast, no model weights."""

import os
import shutil
import struct
import zlib

import numpy as np
import pytest

from retrieval.engine import Engine
from retrieval.errors import CaptionFileError, ModelMismatch, QueryError

from .conftest import make_image
from .fakes import COLORS, FakeEncoder, TokenEncoder

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


def open_engine(tmp_path, encoder=None):
    return Engine.open(tmp_path / "index", create=True, reranker="none", encoder=encoder or FakeEncoder())


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for name, color in COLORS.items():
        make_image(root / f"{name}.jpg", color)
    make_image(root / "sub" / "red2.png", COLORS["red"], fmt="PNG")
    return root


def test_index_search_and_noop_reindex(tmp_path, photos):
    eng = open_engine(tmp_path)
    s = eng.index([photos])
    assert (s.added, s.updated, s.removed) == (5, 0, 0)
    hits = eng.search("red", k=2)
    assert {os.path.basename(h.path) for h in hits} == {"red.jpg", "red2.png"}
    assert hits[0].rank == 1 and hits[0].score >= hits[1].score
    enc = eng.encoder
    before = enc.images_embedded
    s2 = eng.index([photos])
    assert s2.unchanged == 5 and s2.added == 0 and enc.images_embedded == before


def test_moved_file_reuses_vector_and_deleted_file_leaves(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    old_id = eng.store.image_by_path(str(photos / "blue.jpg")).id
    before = eng.encoder.images_embedded
    (photos / "moved").mkdir()
    shutil.move(photos / "blue.jpg", photos / "moved" / "blue-renamed.jpg")
    os.remove(photos / "white.jpg")
    s = eng.index([photos])
    assert (s.moved, s.removed, s.added) == (1, 1, 0)
    assert eng.encoder.images_embedded == before  # no model work for a move
    row = eng.store.image_by_path(str(photos / "moved" / "blue-renamed.jpg"))
    assert row is not None and row.id == old_id
    assert eng.store.count_images() == 4
    assert eng._index("images").ntotal == 4
    hits = eng.search("white", k=4)
    assert all("white.jpg" not in h.path for h in hits)


def test_changed_file_is_reembedded(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    make_image(photos / "red.jpg", COLORS["green"])
    os.utime(photos / "red.jpg", ns=(1, 10**18))
    s = eng.index([photos])
    assert s.updated == 1
    hits = eng.search("green", k=2)
    assert {os.path.basename(h.path) for h in hits} == {"green.jpg", "red.jpg"}


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_bad_input_is_skipped_with_reasons(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    bad = photos / "bad"
    bad.mkdir()
    good = (photos / "red.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image\n")
    _png_header_only(bad / "bomb.png", 30000, 30000)
    os.symlink(bad / "nowhere.jpg", bad / "broken.jpg")
    os.symlink("loop2.jpg", bad / "loop1.jpg")
    os.symlink("loop1.jpg", bad / "loop2.jpg")
    os.symlink(bad, bad / "dirloop")  # directory symlink loop: not followed
    weird = os.path.join(os.fsencode(bad), b"caf\xe9.jpg")
    with open(weird, "wb") as f:
        f.write(good)
    skipped = []
    s = eng.index([photos], on_skip=lambda p, r: skipped.append((os.path.basename(p), r)))
    reasons = dict(skipped)
    assert reasons["truncated.jpg"] in ("truncated", "corrupt")
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not an image"
    assert reasons["bomb.png"] == "decompression bomb"
    assert reasons["broken.jpg"] == "broken symlink"
    assert reasons["loop1.jpg"] == "symlink loop"
    assert any(r == "non-UTF-8 file name" for _, r in skipped)
    assert s.added == 0 and eng.store.count_images() == 5  # nothing lost
    assert len(eng.search("red", k=5)) == 5


def test_large_jpeg_decodes_reduced_other_large_images_refused(tmp_path, monkeypatch):
    """A photo over the pixel limit still indexes when it is a JPEG (draft
    decoding at the encoder's size keeps the decoded pixels small); a PNG of the
    same size is refused with a reason that says what to do."""
    from PIL import Image

    from indexer import decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 250_000)
    monkeypatch.setattr(decode, "MAX_HEADER_PIXELS", 64 * 250_000)
    big = Image.new("RGB", (2000, 1600), (200, 30, 30))
    big.save(tmp_path / "big.jpg", quality=80)
    big.save(tmp_path / "big.png")
    d = decode.decode_image(tmp_path / "big.jpg", draft_size=260)
    assert (d.width, d.height) == (2000, 1600) and min(d.image.size) >= 260
    assert d.image.size[0] * d.image.size[1] <= 250_000
    with pytest.raises(decode.BadImage) as err:
        decode.decode_image(tmp_path / "big.jpg")  # no reduced decoding asked for
    assert err.value.reason == "decompression bomb" and "2000x1600" in err.value.detail
    with pytest.raises(decode.BadImage) as err:
        decode.decode_image(tmp_path / "big.png", draft_size=260)
    assert err.value.reason == "decompression bomb" and "save it as JPEG" in err.value.detail
    _png_header_only(tmp_path / "huge.jpg.png", 200_000, 100_000)  # beyond any reduction
    with pytest.raises(decode.BadImage) as err:
        decode.decode_image(tmp_path / "huge.jpg.png", draft_size=260)
    assert err.value.reason == "decompression bomb"


def test_a_second_writer_waits_for_the_first(tmp_path, photos, caplog):
    """Two engines on one folder (as two processes would be): while one holds
    the writer lock, the other's index run waits, and a search neither waits
    nor writes the FAISS file."""
    import threading
    import time

    first = open_engine(tmp_path)
    first.index([photos])
    before = first.store.count_images()
    second = open_engine(tmp_path)
    more = tmp_path / "more"
    make_image(more / "late.jpg", (10, 10, 10))
    faiss_file = tmp_path / "index" / "images.faiss"
    done = threading.Event()
    with first._writing():
        first.store.remove_paths([str(photos / "red.jpg")])
        faiss_file.unlink()  # a reader rebuilds it, and would write it back if it could
        worker = threading.Thread(target=lambda: (second.index([more]), done.set()))
        with caplog.at_level("WARNING"):
            worker.start()
            time.sleep(0.5)
            assert not done.is_set()  # blocked behind the first writer
            third = open_engine(tmp_path)
            hits = third.search("red", k=10)  # readers are not blocked
            assert "red.jpg" not in {os.path.basename(h.path) for h in hits}
            assert not faiss_file.exists()
        assert any("waiting for it to finish" in r.getMessage() for r in caplog.records)
    worker.join(10)
    assert done.is_set()
    assert open_engine(tmp_path).store.count_images() == before - 1 + 1
    assert "late.jpg" in {os.path.basename(r[1]) for r in first.store.iter_rows_under([str(more)])}


def test_lock_is_reentrant_and_freed_by_a_dead_holder(tmp_path):
    import subprocess
    import sys

    from indexer.lock import IndexLock

    lock = IndexLock(tmp_path)
    with lock.hold() as a:
        with lock.hold() as b:
            assert a and b
        with IndexLock(tmp_path).hold(wait=False) as other:
            assert other is False
    # a process that dies holding the lock leaves it free
    code = f"from indexer.lock import IndexLock; import os; l = IndexLock({str(tmp_path)!r}); l.hold().__enter__(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "pid" in lock.holder()
    with IndexLock(tmp_path).hold(wait=False) as free:
        assert free


def test_avif_indexes_and_unreadable_photo_formats_are_reported(tmp_path):
    from PIL import Image, features

    root = tmp_path / "phone"
    make_image(root / "red.jpg", COLORS["red"])
    if features.check("avif"):
        Image.new("RGB", (64, 48), COLORS["blue"]).save(root / "blue.avif")
    (root / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    (root / "DSC_0002.nef").write_bytes(b"II*\x00" + b"\x00" * 64)
    (root / "notes.txt").write_text("not a photo, passed over in silence")
    eng = open_engine(tmp_path)
    skipped = []
    s = eng.index([root], on_skip=lambda p, r: skipped.append((os.path.basename(p), r)))
    assert sorted(skipped) == [("DSC_0002.nef", "unsupported format (camera raw)"),
                               ("IMG_0001.HEIC", "unsupported format (HEIC)")]
    assert s.added == (2 if features.check("avif") else 1)
    if features.check("avif"):
        assert os.path.basename(eng.search("blue", k=1)[0].path) == "blue.avif"




def test_token_store_is_compacted_and_readers_follow(tmp_path, photos, monkeypatch):
    """Re-embedded and removed images leave dead token slots; once they are
    the larger part the store is rewritten, and an engine opened before (as
    another process would be) still reads each image's own tokens."""
    from indexer.decode import decode_image
    from retrieval import engine as engine_mod

    monkeypatch.setattr(engine_mod, "COMPACT_MIN_DEAD_SLOTS", 2)
    eng = open_engine(tmp_path, TokenEncoder())
    eng.index([photos])
    n = eng.store.count_images()
    reader = open_engine(tmp_path, TokenEncoder())
    assert reader._tokens([1])  # maps the first file
    stale_writer = open_engine(tmp_path, TokenEncoder())  # opened before the compaction, writes after it
    idx = tmp_path / "index"
    assert (idx / "tokens.f16").exists()
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    assert len(files) == n >= 5
    for path, color in zip(files[:3], [(5, 5, 5), (60, 60, 60), (120, 0, 120)]):
        make_image(path, color, size=(70, 50))  # changed content: re-embedded, new slots
    eng.index([photos])
    eng.remove([files[3]])  # 3 + 1 dead slots against n - 1 live: compacted
    assert not (idx / "tokens.f16").exists() and (idx / "tokens-1.f16").exists()
    assert eng.tokens.n_slots == n - 1
    assert eng.status()["token_store"] | {"mb": 0} == {"file": "tokens-1.f16", "mb": 0, "live_slots": n - 1,
                                                        "slots": n - 1}
    enc = TokenEncoder()
    for e in (eng, reader, open_engine(tmp_path, TokenEncoder())):
        rows = {r[1]: r[0] for r in e.store.iter_rows_under([str(photos)])}
        toks = e._tokens(list(rows.values()))
        assert len(toks) == len(rows) == n - 1
        for path, image_id in rows.items():
            want = enc.encode_images_with_tokens([enc.prepare(decode_image(path, enc.input_size).image)])[1][0]
            np.testing.assert_array_equal(toks[image_id], want)
    make_image(tmp_path / "late" / "late.jpg", (0, 90, 200))
    (idx / "tokens-2.f16").write_bytes(b"left by a compaction killed before its switch")
    (idx / "tokens-2.f16.999.tmp").write_bytes(b"killed while copying")
    stale_writer.index([tmp_path / "late"])
    assert sorted(p.name for p in idx.glob("tokens*")) == ["tokens-1.f16", "tokens-1.f16.crc", "tokens.json"]
    assert not (idx / "tokens.f16").exists() and eng.tokens.n_slots == n  # appended to the current file
    late_id = next(iter(eng.store.iter_rows_under([str(tmp_path / "late")])))[0]
    late = decode_image(tmp_path / "late" / "late.jpg", enc.input_size).image
    np.testing.assert_array_equal(eng._tokens([late_id])[late_id], enc.encode_images_with_tokens([enc.prepare(late)])[1][0])
    # a search that read a file's name just before another compaction deleted that file retries
    real = eng.store.token_slots
    calls = []

    def stale_then_real(ids):
        calls.append(1)
        slots, name = real(ids)
        return (slots, "tokens-0.f16") if len(calls) == 1 else (slots, name)

    eng.store.token_slots = stale_then_real
    np.testing.assert_array_equal(eng._tokens([late_id])[late_id], enc.encode_images_with_tokens([enc.prepare(late)])[1][0])
    assert len(calls) == 2
    eng.store.token_slots = real
    # below the threshold nothing is rewritten
    eng.remove([files[4]])
    assert (idx / "tokens-1.f16").exists() and eng.tokens.n_slots == n


def test_under_filter_restricts_inside_recall(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    hits = eng.search("red", k=5, under=str(photos / "sub"))
    assert [os.path.basename(h.path) for h in hits] == ["red2.png"]
    hits = eng.similar(photos / "red.jpg", k=5, under=str(photos / "sub"))
    assert [os.path.basename(h.path) for h in hits] == ["red2.png"]


def test_similar_leaves_out_the_query(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    hits = eng.similar(photos / "red.jpg", k=3)
    assert os.path.basename(hits[0].path) == "red2.png"
    assert all(not h.path.endswith("/red.jpg") for h in hits)


def test_remove_really_removes(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    assert eng.remove([photos / "sub"]) == 1
    assert eng._index("images").ntotal == 4
    assert all("red2" not in h.path for h in eng.search("red", k=10))


def test_model_mismatch_is_refused(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    eng.close()
    with pytest.raises(ModelMismatch, match="rebuild"):
        Engine.open(tmp_path / "index", model="xmr-lite2", reranker="none", encoder=FakeEncoder())
    other = FakeEncoder()
    other.version = "2"
    with pytest.raises(ModelMismatch):
        Engine.open(tmp_path / "index", reranker="none", encoder=other)


def test_nonsense_queries_are_refused(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    with pytest.raises(QueryError):
        eng.search("   ")
    with pytest.raises(QueryError):
        eng.search("x" * 5000)
    with pytest.raises(QueryError):
        eng.search("red", k=0)
    assert len(eng.search("@@@ ### ???", k=3)) == 3


def test_caption_import_streams_in_batches_and_refuses_a_broken_file_whole(tmp_path, photos):
    eng = open_engine(tmp_path)
    caps = tmp_path / "caps.txt"
    lines = [f"red.jpg#{i}\tcaption number {i}" for i in range(300)]
    caps.write_text("\n".join(lines + lines[::-1] + ["red.jpg#x\tcaption number 7"]) + "\n")
    totals, done = [], []
    res = eng.import_captions(caps, progress=done.append, on_total=totals.append)
    # the repeats in later batches are found in the database, not in a set of the whole file
    assert (res["imported"], res["duplicates"], res["total"]) == (300, 301, 300)
    assert totals == [601] and done == [256, 256, 89]
    assert sorted(r.text for r in eng.store.caption_rows(range(1, 400)).values()) == sorted(
        f"caption number {i}" for i in range(300))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [' + ", ".join(
        f'{{"filename": "red.jpg", "sentences": [{{"raw": "new caption {i}"}}]}}' for i in range(600)))
    with pytest.raises(CaptionFileError, match="Karpathy"):
        eng.import_captions(broken)
    assert eng.store.count_captions() == 300  # nothing of it was imported before the end showed it broken
    assert eng.import_captions(caps)["imported"] == 0


def test_captions_import_formats_and_lookup(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    csv_file = tmp_path / "caps.csv"
    csv_file.write_text('image,caption\nred.jpg,"a red, red square"\nbroken-line\ngreen.jpg,a green field\n')
    res = eng.import_captions(csv_file)
    assert res["imported"] == 2 and res["malformed"] == 1
    again = eng.import_captions(csv_file)
    assert again["imported"] == 0 and again["duplicates"] == 2
    txt = tmp_path / "caps.txt"
    txt.write_text("blue sky\n\nwhite snow\n" + "".join(f"caption number {i}\n" for i in range(300)))
    totals, done = [], []
    assert eng.import_captions(txt, progress=done.append, on_total=totals.append)["imported"] == 302
    assert totals == [302] and sum(done) == 302 and len(done) == 2  # batches of 256
    hits = eng.caption(photos / "blue.jpg", k=1)
    assert hits[0].caption == "blue sky"


def test_index_files_are_rebuilt_when_stale_or_damaged(tmp_path, photos):
    eng = open_engine(tmp_path)
    eng.index([photos])
    eng.close()
    (tmp_path / "index" / "images.faiss").write_bytes(b"garbage")
    eng2 = open_engine(tmp_path)
    assert eng2._index("images").ntotal == 5
    assert len(eng2.search("red", k=2)) == 2


def test_index_updates_replay_the_journal_instead_of_rebuilding(tmp_path, photos, monkeypatch):
    import retrieval.engine as engine_mod

    builds = []
    real_build = engine_mod.build_index
    monkeypatch.setattr(engine_mod, "build_index", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    eng = open_engine(tmp_path)
    other = open_engine(tmp_path)  # a second process on the same index, e.g. the server
    eng.index([photos])
    assert len(builds) == 1
    other_hits = other.search("blue", k=5)  # loads the saved file; no rebuild
    assert len(builds) == 1 and len(other_hits) == 5
    os.remove(photos / "white.jpg")
    make_image(photos / "green2.jpg", COLORS["green"])
    make_image(photos / "red.jpg", COLORS["blue"])  # changed in place: a new row replaces the old
    s = eng.index([photos])
    assert (s.added, s.updated, s.removed) == (1, 1, 1)
    assert len(builds) == 1  # replayed, not rebuilt
    assert eng._index("images").ntotal == 5
    # a few changes do not rewrite the file: it stays behind, with the journal since then
    import json

    side = json.loads((tmp_path / "index" / "images.faiss.json").read_text())
    assert side["generation"] < eng.store.generation("images")
    assert eng.store.pending_changes("images", side["generation"]) > 0
    # the other process replays the same journal onto its cached index
    got = [(os.path.basename(h.path), round(h.score, 5)) for h in other.search("green", k=5)]
    assert len(builds) == 1
    for f in (tmp_path / "index").glob("images.faiss*"):
        f.unlink()
    fresh = open_engine(tmp_path)
    want = [(os.path.basename(h.path), round(h.score, 5)) for h in fresh.search("green", k=5)]
    assert len(builds) == 2 and got == want
    assert {"green.jpg", "green2.jpg"} == {n for n, _ in want[:2]}
    assert "white.jpg" not in {n for n, _ in want}


def test_query_bank_corrects_recall_scores_exactly(tmp_path, photos):
    import numpy as np

    from retrieval.encoders.base import l2_normalize
    from retrieval.encoders.querybank import QueryBank

    enc = FakeEncoder()
    rng = np.random.default_rng(0)
    # a bank of queries that mostly point at white: the white image becomes a hub and is pushed down
    white_text = enc.encode_texts(["white"])[0]
    texts = l2_normalize(white_text + 0.05 * rng.standard_normal((50, enc.dim)))
    images = l2_normalize(rng.standard_normal((20, enc.dim)))
    enc.querybank = QueryBank(texts.astype(np.float32), images.astype(np.float32), beta=10.0, alpha=1.0)
    eng = open_engine(tmp_path, enc)
    eng.index([photos])
    q = enc.encode_texts(["red white"])[0]
    hits = eng.search("red white", k=5)
    rows = eng.store.image_rows([h.id for h in hits])
    for h in hits:
        v = np.frombuffer(rows[h.id].embedding, np.float32)
        want = float(v @ q - enc.querybank.image_bias(v[None])[0])
        assert abs(h.score - want) < 1e-4 and rows[h.id].bias is not None
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    plain = Engine.open(tmp_path / "plain", create=True, reranker="none", encoder=FakeEncoder())
    plain.index([photos])
    order = [os.path.basename(h.path) for h in plain.search("red white", k=5)]
    corrected = [os.path.basename(h.path) for h in hits]
    assert order[0] == "white.jpg" and corrected[0] in ("red.jpg", "red2.png")
    # image -> image similarity is a plain cosine, untouched by the bank
    sim = eng.similar(photos / "red.jpg", k=1)[0]
    assert sim.path.endswith("red2.png") and abs(sim.score - 1.0) < 1e-3


def test_a_pure_move_rewrites_only_the_sidecar(tmp_path, photos):
    import json

    eng = open_engine(tmp_path)
    eng.index([photos])
    faiss_file = tmp_path / "index" / "images.faiss"
    before = faiss_file.stat().st_mtime_ns
    os.utime(faiss_file, ns=(before - 10**9, before - 10**9))  # make a rewrite visible
    shutil.move(photos / "blue.jpg", photos / "blue-renamed.jpg")
    assert eng.index([photos]).moved == 1
    side = json.loads((tmp_path / "index" / "images.faiss.json").read_text())
    assert side["generation"] == eng.store.generation("images")
    assert faiss_file.stat().st_mtime_ns == before - 10**9
    fresh = open_engine(tmp_path)  # the file on disk is trusted at the new generation
    assert [h.path for h in fresh.search("blue", k=1)] == [str(photos / "blue-renamed.jpg")]


def test_overlapping_roots_index_each_file_once(tmp_path, photos):
    from indexer.walk import normalise_roots

    assert normalise_roots([photos / "sub", photos, photos / "red.jpg", str(photos) + "/"]) == [str(photos)]
    eng = open_engine(tmp_path)
    s = eng.index([photos / "sub", photos, photos / "red.jpg"])
    assert (s.added, s.unchanged) == (5, 0)
    s = eng.index([photos / "red.jpg"])  # a single file of the collection: the others stay
    assert (s.unchanged, s.removed) == (1, 0) and eng.store.count_images() == 5
    os.remove(photos / "sub" / "red2.png")
    s = eng.index([photos / "sub"])  # its folder now holds no image: offline, kept
    assert s.removed == 0 and sum(s.offline.values()) == 1 and eng.store.count_images() == 5
    s = eng.index([photos / "sub"], prune=True)
    assert s.removed == 1 and eng.store.count_images() == 4


def test_each_new_file_is_read_once(tmp_path, photos, monkeypatch):
    import builtins
    from collections import Counter

    opened = Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(photos)):
            opened[str(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    eng = open_engine(tmp_path)
    assert eng.index([photos]).added == 5
    assert len(opened) == 5 and set(opened.values()) == {1}  # hashed and decoded from one read
    opened.clear()
    shutil.move(photos / "blue.jpg", photos / "blue2.jpg")
    assert eng.index([photos]).moved == 1
    assert dict(opened) == {str(photos / "blue2.jpg"): 1}  # a move is hashed, never decoded


def test_worker_processes_index_like_threads(tmp_path, photos):
    """Decoding in worker processes gives the rows threads give: same vectors,
    bad files skipped with the same reasons, a move still costs no model work."""
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.png").write_text("hello")
    by_threads = open_engine(tmp_path / "t")
    a = by_threads.index([photos])
    by_procs = open_engine(tmp_path / "p")
    b = by_procs.index([photos], processes=2)
    assert (b.added, dict(b.skipped)) == (a.added, dict(a.skipped)) and b.added == 5
    for name in ("red.jpg", "sub/red2.png", "white.jpg"):
        ra, rb = by_threads.store.image_by_path(str(photos / name)), by_procs.store.image_by_path(str(photos / name))
        assert ra.sha256 == rb.sha256 and (ra.width, ra.height) == (rb.width, rb.height)
        assert ra.embedding == rb.embedding  # float32 bytes
    before = by_procs.encoder.images_embedded
    shutil.move(photos / "green.jpg", photos / "green-moved.jpg")
    c = by_procs.index([photos], processes=2)
    assert (c.moved, c.added, c.removed) == (1, 0, 0) and by_procs.encoder.images_embedded == before


# -- upgrading an index to a new version of its model ---------------------------
class _Release(FakeEncoder):
    """A release of the fake model: ``version`` names it, ``side`` its image
    side, ``shift`` changes its text side, ``bank_seed`` its query bank."""

    def __init__(self, version, side="img-1", shift=0.0, bank_seed=0):
        import numpy as np

        from retrieval.encoders.base import l2_normalize
        from retrieval.encoders.querybank import QueryBank

        super().__init__()
        self.version, self.side, self.shift = version, side, shift
        self.texts_embedded = 0
        rng = np.random.default_rng(bank_seed)
        white = l2_normalize(self._color_vec(np.array(COLORS["white"]) / 255.0))
        texts = l2_normalize(white + 0.3 * rng.standard_normal((40, self.dim))).astype(np.float32)
        images = l2_normalize(rng.standard_normal((20, self.dim))).astype(np.float32)
        self.querybank = QueryBank(texts, images, beta=10.0, alpha=1.0)

    def image_side(self):
        return self.side

    def _embed_texts(self, texts):
        self.texts_embedded += len(texts)
        out = super()._embed_texts(texts)
        out[:, 5] += self.shift
        return out


def _fill(eng, photos, tmp_path):
    eng.index([photos])
    caps = tmp_path / "caps.txt"
    caps.write_text("a red square\na green field\nblue sky\nwhite snow\n"
                    + "".join(f"caption number {i}\n" for i in range(600)))
    eng.import_captions(caps)


def _answers(eng, photos):
    return ([(h.path, round(h.score, 5)) for q in ("red", "white green", "blue sky") for h in eng.search(q, k=5)],
            [(h.caption, round(h.score, 5)) for h in eng.caption(photos / "blue.jpg", k=5, rerank=False)])


def test_an_index_of_an_earlier_release_is_upgraded_in_place_to_what_a_fresh_build_gives(tmp_path, photos):
    from retrieval.errors import IndexNeedsUpgrade

    first = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("1"))
    _fill(first, photos, tmp_path)
    before = _answers(first, photos)
    first.close()
    new = _Release("2", shift=0.4, bank_seed=1)  # another text side and bank, same image side
    with pytest.raises(IndexNeedsUpgrade, match="xmr --index .* upgrade"):
        Engine.open(tmp_path / "index", reranker="none", encoder=new)
    eng = Engine.open(tmp_path / "index", reranker="none", encoder=new, upgrade=True)
    with pytest.raises(IndexNeedsUpgrade):  # nothing may use it before the upgrade
        eng.search("red")
    new.texts_embedded = 0
    totals, done = [], []
    out = eng.upgrade(progress=done.append, on_total=totals.append)
    assert out == {"from": "1", "to": "2", "images": 5, "captions": 604, "upgraded": True}
    assert totals == [609] and sum(done) == 609
    assert new.images_embedded == 0 and new.texts_embedded == 604  # no image read again
    got = _answers(eng, photos)
    fresh_enc = _Release("2", shift=0.4, bank_seed=1)
    fresh = Engine.open(tmp_path / "fresh", reranker="none", encoder=fresh_enc)
    _fill(fresh, photos, tmp_path)
    assert got == _answers(fresh, photos)
    assert got != before  # the new release scores differently: the upgrade changed what it had to
    again = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("2", shift=0.4, bank_seed=1))
    assert again.store.get_meta()["model_version"] == "2" and _answers(again, photos) == got
    assert again.upgrade()["upgraded"] is False
    # another image side cannot be upgraded: the images must be embedded again
    with pytest.raises(ModelMismatch, match="rebuild") as exc:
        Engine.open(tmp_path / "index", reranker="none", encoder=_Release("3", side="img-2"))
    assert not isinstance(exc.value, IndexNeedsUpgrade)


def _image_biases(eng):
    return [(int(i), float(b)) for ids, _, bias in eng.store.iter_vectors("images", eng.encoder.dim)
            for i, b in zip(ids, bias)]


def test_an_interrupted_upgrade_leaves_the_index_as_it_was(tmp_path, photos):
    first = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("1"))
    _fill(first, photos, tmp_path)
    before = _answers(first, photos)
    rows_before = _image_biases(first)
    first.close()

    class Killed(_Release):
        def _embed_texts(self, texts):  # dies on the captions, after every image bias was rewritten
            if self.texts_embedded >= 300:
                raise KeyboardInterrupt
            return super()._embed_texts(texts)

    eng = Engine.open(tmp_path / "index", reranker="none", encoder=Killed("2", shift=0.4, bank_seed=1), upgrade=True)
    with pytest.raises(KeyboardInterrupt):
        eng.upgrade()
    eng.close()
    again = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("1"))
    assert again.store.get_meta()["model_version"] == "1"
    assert _image_biases(again) == rows_before
    assert _answers(again, photos) == before
    # and the upgrade can then run to the end
    done = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("2", shift=0.4, bank_seed=1),
                       upgrade=True).upgrade()
    assert done["upgraded"] and done["captions"] == 604


def test_an_index_from_before_the_image_side_record_upgrades_only_from_a_listed_release(tmp_path, photos):
    from retrieval.errors import IndexNeedsUpgrade

    eng = Engine.open(tmp_path / "index", reranker="none", encoder=_Release("1"))
    _fill(eng, photos, tmp_path)
    assert eng.store.get_meta()["image_side"] == "img-1"
    eng.store.set_meta(image_side="")  # as an index made before the record
    eng.close()
    unlisted = _Release("2", shift=0.4)
    with pytest.raises(ModelMismatch, match="rebuild") as exc:
        Engine.open(tmp_path / "index", reranker="none", encoder=unlisted)
    assert not isinstance(exc.value, IndexNeedsUpgrade)
    listed = _Release("2", shift=0.4)
    listed.earlier_versions = ("0", "1")
    with pytest.raises(IndexNeedsUpgrade):
        Engine.open(tmp_path / "index", reranker="none", encoder=listed)
    # opened by the release that made it, the index records its image side
    Engine.open(tmp_path / "index", reranker="none", encoder=_Release("1")).close()
    assert Engine.open(tmp_path / "index", reranker="none",
                       encoder=_Release("1")).store.get_meta()["image_side"] == "img-1"


def test_compressed_index_answers_like_exact_search(tmp_path):
    """Past the compression limit the image index keeps 8-bit codes; recall
    then re-scores a larger candidate set from the stored float vectors, so
    text search and similar images return what exact search returns, with
    the same scores. (Limits lowered: 300 images, IVF past 100, 8-bit past 200.)"""
    rng = np.random.default_rng(0)
    root = tmp_path / "many"
    for i in range(300):
        make_image(root / f"{i:03d}.png", tuple(int(c) for c in rng.integers(0, 256, 3)), size=(8, 8), fmt="PNG")
    answers = {}
    tiers = {"exact": ({}, "IDMap2,Flat"), "codes": ({"exact_limit": 100, "compress_limit": 200}, ",SQ8"),
             "product": ({"exact_limit": 100, "compress_limit": 150, "pq_limit": 200}, ",PQ4")}
    for name, (limits, kind) in tiers.items():
        engine = Engine.open(tmp_path / name, create=True, reranker="none", encoder=FakeEncoder())
        for key, value in limits.items():
            setattr(engine, key, value)
        engine.index([root])
        assert engine.status()["index_type"].endswith(kind)
        hits = [engine.search(q, k=8, rerank=False) for q in ("red", "green blue", "white red")]
        hits.append(engine.similar(root / "007.png", k=8))
        answers[name] = [([h.id for h in hs], [h.score for h in hs]) for hs in hits]
        engine.close()
    for tier in ("codes", "product"):
        for (ids, scores), (want_ids, want_scores) in zip(answers[tier], answers["exact"]):
            assert ids == want_ids and np.allclose(scores, want_scores, atol=1e-5), tier
        assert 7 not in answers[tier][-1][0]  # the query image is left out of its similar images
