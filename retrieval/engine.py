"""The Engine: composes an encoder, the metadata store, the FAISS indexes and
an optional reranker. Every CLI command is one call on it."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from indexer.database import ENV_VAR as DATABASE_ENV
from indexer.database import SQLITE_FILE, DatabaseChoiceError, Location, drop_schema, locate, read_record, remember
from indexer.decode import BadImage, decode_image
from indexer.lock import AdvisoryLock, IndexLock, ReadWriteLock
from indexer.pipeline import Indexer, IndexSummary
from indexer.ray_runner import RayOptions
from indexer.store import TOKEN_FILE_KEY, Store, StoreError
from indexer.tokens import DEFAULT_FILE as TOKENS_DEFAULT_FILE
from indexer.tokens import TokenShapeMismatch, TokenStore, TokenStoreDamaged
from indexer.vectors import COMPRESS_LIMIT, EXACT_LIMIT, PQ_LIMIT, VectorIndex, build_index, spec_still_fits
from indexer.walk import lies_below
from reranker.base import ImageCandidate, Reranker, fuse, rerank_order

from .captions import CaptionFile
from .encoders import DEFAULT_MODEL, DualEncoder, create_encoder
from .encoders.querybank import augment_items, augment_queries
from .errors import (
    CaptionFileError,
    ClusterUnavailable,
    ImageUnusable,
    IndexNeedsUpgrade,
    IndexNotFound,
    IndexUnusable,
    ModelMismatch,
    PathNotFound,
    QueryError,
    database_error_detail,
)

log = logging.getLogger(__name__)

DB_NAME = SQLITE_FILE
MAX_K = 1000
MAX_QUERY_CHARS = 1000
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Rerankers that score pixels (Hugging Face BLIP: 384 px) get images decoded
# at no less than this short side: JPEGs of any size then decode in draft mode.
PIXEL_RERANK_SIZE = 1024
# A FAISS file is rewritten once this many changes (or 1% of its vectors) are
# journaled past it; fewer are replayed by whoever loads it.
SAVE_AFTER_CHANGES = 1000
# An index of 8-bit codes (past COMPRESS_LIMIT vectors) recalls this many
# times the candidates asked for, re-scored exactly from the float vectors in
# SQLite (synthetic 1.5M: recall@10 vs exact 0.962 -> 1.0 for the top 40).
RESCORE_FACTOR = 4
# The token store is rewritten without dead slots (removed or re-embedded
# images) once they outnumber the live ones and are at least this many.
COMPACT_MIN_DEAD_SLOTS = 1000


@dataclass
class ImageHit:
    rank: int
    score: float
    path: str
    id: int
    similarity: float
    reranked: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionHit:
    rank: int
    score: float
    caption: str
    id: int
    source: str
    image: str | None
    similarity: float
    reranked: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IndexedFile:
    id: int
    path: str
    size: int
    sha256: str


def _check_k(k: int) -> int:
    if not isinstance(k, int) or k < 1 or k > MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def check_templates(templates: Iterable[str]) -> list[str]:
    """Prompt templates as given, each checked to hold one ``{}`` for the label."""
    out = [str(t) for t in templates]
    if not out:
        raise QueryError('no template given; a template holds {} where the label goes: "a photo of a {}."')
    for t in out:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise QueryError(f"template {t!r} must hold exactly one {{}} (where the label goes) and no other "
                             'braces, as in "a photo of a {}."')
    return out


def _check_query(text: str) -> str:
    # control characters (a NUL, an escape) count as spaces: a query of them alone is empty
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    if not text:
        raise QueryError("the query is empty; type some words describing the image you want")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text)} characters long; keep it under {MAX_QUERY_CHARS}")
    return text


def same_image_side(meta: dict, encoder: DualEncoder) -> bool:
    """Whether an index's stored image vectors and region tokens are what
    ``encoder`` makes: the image side the index recorded is the encoder's, or,
    for an index from before that record, it was built with an earlier release
    the model lists as sharing its image side."""
    if str(meta.get("dim", encoder.dim)) != str(encoder.dim):
        return False
    if meta.get("image_side"):
        return meta["image_side"] == encoder.image_side()
    return meta.get("model_version") in encoder.earlier_versions


def _record_image_side(store: Store, encoder: DualEncoder) -> None:
    """Record the image side of an index made before the record existed (its
    version is the encoder's, so its images are the encoder's): the next
    release can then upgrade it in place. Skipped on a read-only index."""
    from sqlalchemy.exc import DBAPIError

    try:
        store.set_meta(image_side=encoder.image_side())
    except (DBAPIError, OSError) as exc:
        log.debug("image side not recorded: %s", exc)


class Engine:
    def __init__(self, index_dir: Path, store: Store, encoder: DualEncoder, reranker: Reranker | None = None,
                 exact_limit: int = EXACT_LIMIT, compress_limit: int = COMPRESS_LIMIT, pq_limit: int = PQ_LIMIT):
        self.index_dir = Path(index_dir)
        self.store = store
        self.encoder = encoder
        self.reranker = reranker
        self.exact_limit = exact_limit
        self.compress_limit = compress_limit
        self.pq_limit = pq_limit
        self._indexes: dict[str, VectorIndex] = {}
        # searches on several threads (the server) read the FAISS indexes
        # together; bringing one up to date waits for them and they for it
        self._faiss_rw = ReadWriteLock()
        self._lock = IndexLock(self.index_dir, AdvisoryLock(store.engine, store.location.lock_key("writer"))
                               if store.dialect == "postgresql" else None)
        # the model version the stored items were made with, where it is an
        # earlier one that :meth:`upgrade` must bring up to date before use
        self.pending_upgrade: str | None = None
        shape = getattr(encoder, "token_shape", None)
        token_file = store.get_meta().get(TOKEN_FILE_KEY, TOKENS_DEFAULT_FILE)
        try:
            self.tokens = TokenStore(self.index_dir, shape, token_file) if shape else None
        except TokenShapeMismatch as exc:
            raise IndexUnusable(f"{exc}: the index's region tokens belong to another model; rebuild it in a new "
                                "index folder: xmr --index NEW_DIR index FOLDER") from None

    # -- opening ----------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike, model: str | None = None, create: bool = True,
             device: str | None = None, reranker: str | None = "auto", encoder: DualEncoder | None = None,
             upgrade: bool = False, database: str | None = None) -> "Engine":
        """Open (or create) the index in ``index_dir``.

        ``database`` is where a new index keeps its rows: None reads
        ``XMR_DATABASE``; unset or '' is SQLite in ``index_dir``; a
        ``postgresql://`` URL is a schema of its own on that server. An
        existing index stays where it was created and refuses another.

        ``model`` names the encoder when the index is created; an existing
        index refuses another. ``reranker`` is ``"auto"`` (the model's own
        reranker, if it has one), ``None``/``"none"``, or a Hugging Face BLIP
        name or folder. An index built with an earlier version of its model
        that shares this version's image side is refused
        (:class:`IndexNeedsUpgrade`) unless ``upgrade``: it then opens with
        ``pending_upgrade`` set, and only :meth:`upgrade` may use it.
        """
        index_dir = Path(index_dir).expanduser().resolve()
        if database is None:
            database = os.environ.get(DATABASE_ENV) or None
        try:
            where = locate(index_dir, database, create=create)
        except DatabaseChoiceError as exc:
            raise IndexUnusable(str(exc)) from None
        if where is None:
            raise IndexNotFound(f"no index in {index_dir}; create one with: xmr --index {index_dir} index FOLDER")
        try:
            index_dir.mkdir(parents=True, exist_ok=True)  # a new index's folder (an existing one: nothing to do)
        except OSError as exc:
            raise IndexUnusable(f"cannot create the index folder {index_dir} ({exc.strerror or exc}); "
                                "choose another with --index DIR or XMR_INDEX") from None
        store = _open_store(where)
        if where.schema and read_record(index_dir) is None:  # a new PostgreSQL index: the folder records it
            store = _remember(index_dir, store)
        meta = store.get_meta()
        stored_model = meta.get("model")
        if stored_model and model and model != stored_model:
            raise ModelMismatch(
                f"the index in {index_dir} was built with model {stored_model!r}, not {model!r}; "
                f"to switch, rebuild it: xmr --index NEW_DIR index --model {model} FOLDER"
            )
        name = stored_model or model or (encoder.name if encoder else DEFAULT_MODEL)
        enc = encoder or create_encoder(name, device=device)
        pending = None
        if stored_model and meta.get("model_version") and meta["model_version"] != enc.version:
            if not same_image_side(meta, enc):
                raise ModelMismatch(
                    f"the index in {index_dir} was built with another version of {name!r} "
                    f"({meta['model_version']} vs {enc.version}) whose image vectors differ; rebuild it in a new "
                    f"index folder: xmr --index NEW_DIR index FOLDER"
                )
            if not upgrade:
                raise IndexNeedsUpgrade(
                    f"the index in {index_dir} was built with an earlier version of {name!r} "
                    f"({meta['model_version']} vs {enc.version}); its images are still valid: bring it up to date "
                    f"with: xmr --index {index_dir} upgrade (re-embeds its captions and re-scores its images; "
                    "no image file is read again)"
                )
            pending = meta["model_version"]
        if not stored_model:
            store.set_meta(model=name, model_version=enc.version, image_side=enc.image_side(), dim=enc.dim)
        elif pending is None and not meta.get("image_side"):
            _record_image_side(store, enc)
        rr = None
        if reranker == "auto":
            rr = _own_reranker(enc)
        elif reranker and reranker != "none":
            from reranker.hf_blip import BlipReranker

            rr = BlipReranker(reranker[3:] if reranker.startswith("hf:") else reranker, device=device)
        engine = cls(index_dir, store, enc, rr)
        engine.pending_upgrade = pending
        return engine

    def close(self) -> None:
        self.store.close()

    # -- vector indexes (derived from the store) --------------------------------
    @property
    def querybank(self):
        return getattr(self.encoder, "querybank", None)

    def _index_dim(self) -> int:
        # with a query bank, each vector carries its bias as one extra dimension
        return self.encoder.dim + (1 if self.querybank is not None else 0)

    def _gallery_vectors(self, name: str, vecs: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Stored vectors as the FAISS index holds them."""
        bank = self.querybank
        if bank is None:
            return vecs
        missing = np.isnan(bias)
        if missing.any():  # rows written before the model had a bank
            bias = bias.copy()
            bias[missing] = (bank.image_bias if name == "images" else bank.text_bias)(vecs[missing])
        return augment_items(vecs, bias)

    def _query_vectors(self, vecs: np.ndarray, corrected: bool = True) -> np.ndarray:
        """Query vectors for the FAISS index: ``cos - bias`` when corrected, plain cosine otherwise."""
        if self.querybank is None:
            return np.atleast_2d(vecs)
        return augment_queries(vecs, corrected)

    def _stream(self, name: str, ids=None):
        for row_ids, vecs, bias in self.store.iter_vectors(name, self.encoder.dim, ids=ids):
            yield row_ids, self._gallery_vectors(name, vecs, bias)

    def _count(self, name: str) -> int:
        return self.store.count_images() if name == "images" else self.store.count_captions()

    def _load_file(self, path: Path) -> VectorIndex | None:
        if not path.is_file():
            return None
        try:
            index, side = VectorIndex.load(path)
        except Exception as exc:  # a damaged file is rebuilt from the store
            log.warning("rebuilding %s: %s", path.name, exc)
            return None
        if side.get("model") != self.encoder.name or side.get("model_version") != self.encoder.version \
                or index.dim != self._index_dim():
            return None
        if side.get("ntotal", index.ntotal) != index.ntotal:  # caught between a file and its sidecar
            log.info("rebuilding %s: its sidecar describes another write", path.name)
            return None
        return index

    def _catch_up(self, index: VectorIndex, name: str, gen: int) -> int | None:
        """Replay the store's journal onto ``index``: the number of ids it
        touched, or None when a rebuild is needed instead."""
        if index.generation is None or index.generation > gen:
            return None
        changes = self.store.changes(name, index.generation, gen)
        if changes is None or not spec_still_fits(index.spec, self._count(name), self.exact_limit,
                                                   self.compress_limit, self.pq_limit):
            return None
        added, touched = changes
        index.remove(touched)
        for ids, vecs in self._stream(name, ids=added):
            index.add(ids, vecs)
        index.generation = gen
        return len(touched)

    def _index(self, name: str) -> VectorIndex:
        """The FAISS index of ``images`` or ``captions``, brought up to the
        store's generation: replayed from the journal where possible, rebuilt
        from the rows otherwise; written back after a rebuild or once enough
        changes have piled up past the file (:data:`SAVE_AFTER_CHANGES`)."""
        self._check_current()
        gen = self.store.generation(name)
        cached = self._indexes.get(name)
        if cached is not None and cached.generation == gen:
            return cached
        with self._faiss_rw.write():
            return self._refresh(name)

    def _refresh(self, name: str) -> VectorIndex:
        gen = self.store.generation(name)
        cached = self._indexes.get(name)
        if cached is not None and cached.generation == gen:  # another thread did it while we waited
            return cached
        path = self.index_dir / f"{name}.faiss"
        index, start, touched = None, None, None
        for candidate in (lambda: cached, lambda: self._load_file(path)):
            index = candidate()
            if index is not None:
                start = index.generation
                touched = 0 if index.generation == gen else self._catch_up(index, name, gen)
                if touched is not None:
                    break
            index = None
        if index is None:
            index = build_index(self._index_dim(), lambda: self._stream(name), self._count(name), self.exact_limit,
                                compress_limit=self.compress_limit, pq_limit=self.pq_limit)
            index.generation = gen
            self.store.set_meta(**{f"{name}_factory": index.spec.factory, f"{name}_params": index.spec.params})
        with self._lock.hold(wait=False) as writable:  # a writer elsewhere: its run writes the file
            if writable:
                try:
                    self._write_back(index, name, path, start, touched)
                except OSError as exc:  # housekeeping: the store is the truth, the file is written next time
                    log.warning("%s not saved (%s); the index works from memory and the file is written "
                                "on a later run", path.name, exc.strerror or exc)
        self._indexes[name] = index
        return index

    def _write_back(self, index: VectorIndex, name: str, path: Path, start: int | None, touched: int | None) -> None:
        gen = index.generation
        saved = _saved_generation(path)
        if saved is not None and saved > gen:  # another process already wrote a newer file
            return
        facts = {"model": self.encoder.name, "model_version": self.encoder.version}
        if touched is None or saved is None:
            index.save(path, facts)
            self.store.prune_changes(name, gen)
        elif saved < gen:  # never overwrite a file another process already brought further
            if touched == 0 and saved == start:
                # only moves since the file was written: its vectors are still right
                index.save(path, facts, vectors=False)
                self.store.prune_changes(name, gen)
            elif self.store.pending_changes(name, saved) >= max(SAVE_AFTER_CHANGES, index.ntotal // 100):
                index.save(path, facts)
                self.store.prune_changes(name, gen)
            # else the file stays at its generation and the journal since then
            # stays too: whoever loads the file replays it (cheaper than
            # rewriting a large index for a few changes)

    # -- indexing ---------------------------------------------------------------
    def index(self, paths, on_skip: Callable | None = None, progress: Callable | None = None,
              on_total: Callable | None = None, batch_size: int = 32, threads: int | None = None,
              processes: int = 0, prune: bool = False, ray: RayOptions | None = None) -> IndexSummary:
        """Bring the index up to date with ``paths``. ``processes > 0`` decodes
        in that many worker processes instead of threads (many cores feeding a
        GPU); models whose preprocessing cannot leave the process use threads.
        ``ray`` lists, decodes and embeds on a Ray cluster instead
        (:mod:`indexer.ray_runner`); this process still makes every decision
        and every write, so the index is the one the other paths build.
        Images whose whole folder is missing, empty or unreadable are kept
        (``summary.offline``) unless ``prune``. A path that does not exist and
        holds no indexed image is refused (:class:`PathNotFound`): a typo.
        Images whose region tokens are damaged are embedded again."""
        roots = [os.path.abspath(os.fspath(p)) for p in paths]
        for root in roots:
            if not os.path.lexists(root) and next(iter(self.store.iter_rows_under([root])), None) is None:
                raise PathNotFound(f"{root}: no such file or folder, and nothing indexed there")
        enc = self.encoder
        prepare = enc.prepare
        runner = self._ray_runner(ray) if ray is not None else None
        if processes and runner is None:
            prepare = enc.portable_prepare
            if prepare is None:
                log.warning("%s decodes on threads: its preprocessing cannot run in worker processes", enc.name)
                prepare, processes = enc.prepare, 0
        with self._writing():
            indexer = Indexer(self.store, prepare, enc.encode_images_with_tokens, batch_size=batch_size,
                              threads=threads, draft_size=enc.input_size, tokens=self.tokens,
                              bias=self.querybank.image_bias if self.querybank is not None else None,
                              processes=processes, runner=runner)
            damaged = self._damaged_token_paths(roots)
            summary = indexer.run(roots, on_skip=on_skip, progress=progress, on_total=on_total, prune=prune,
                                  force=damaged)
            self._index("images")
            self._compact_tokens()
        return summary

    def _ray_runner(self, options: RayOptions):
        from indexer.ray_runner import RayRunner, RayUnavailable  # imports ray only when it starts

        enc = self.encoder
        if enc.portable_factory is None or enc.portable_prepare is None:
            raise ClusterUnavailable(f"{enc.name} cannot be rebuilt on Ray workers; index without --ray")
        try:
            return RayRunner(enc.portable_factory, enc.portable_prepare, enc.input_size, options)
        except RayUnavailable as exc:
            raise ClusterUnavailable(str(exc)) from None

    def _damaged_token_paths(self, roots: list[str]) -> set[str]:
        """Paths of the images whose region tokens are missing from the token
        file or fail their checksums (a truncated, zeroed or deleted file), to
        be embedded again. Call with the writer lock held."""
        if self.tokens is None:
            return set()
        ids, slots = self.store.live_token_slots()
        bad = set(self.tokens.check(slots))
        if not bad:
            return set()
        bad_ids = [int(i) for i, s in zip(ids, slots) if int(s) in bad]
        paths = {row.path for row in self.store.image_rows(bad_ids).values()}
        inside = {p for p in paths if p in roots or lies_below(p, set(roots))}
        log.warning("the region tokens of %d image%s are damaged (%s); embedding %s again", len(paths),
                    "s" if len(paths) != 1 else "", self.tokens.path.name, "them" if len(paths) != 1 else "it")
        if len(inside) < len(paths):
            log.warning("%d of them lie outside the folders named; index their folders too to rebuild theirs",
                        len(paths) - len(inside))
        return inside

    def remove(self, paths) -> int:
        with self._writing():
            n = self.store.remove_paths([os.path.abspath(os.fspath(p)) for p in paths])
            self._index("images")
            self._compact_tokens()
        return n

    def _check_current(self) -> None:
        if self.pending_upgrade is not None:
            raise IndexNeedsUpgrade(f"the index in {self.index_dir} still holds items of {self.encoder.name} "
                                    f"version {self.pending_upgrade}; run Engine.upgrade() (xmr upgrade) first")

    @contextmanager
    def _writing(self, check_current: bool = True):
        """Hold the index folder's writer lock (waiting for another process's
        run), on the token file the database names: a run that held the lock
        before may have compacted it, and files it replaced are deleted."""
        if check_current:
            self._check_current()
        with self._lock.hold(on_wait=lambda who: log.warning(
                "another xmr process%s is changing the index in %s; waiting for it to finish",
                f" ({who})" if who else "", self.index_dir)):
            if self.tokens is not None:
                self._follow_token_file()
                self._drop_stale_token_files()
            yield

    # -- captions ---------------------------------------------------------------
    def import_captions(self, path: str | os.PathLike, fmt: str = "auto",
                        on_bad: Callable[[str, str], None] | None = None, progress: Callable | None = None,
                        on_total: Callable | None = None) -> dict:
        """Import a caption file, streamed a batch at a time (memory does not
        grow with the file); ``on_bad(where, reason)`` hears of each entry
        skipped as malformed (``where``: "line 3", or "images[2] (a.jpg)" in
        JSON); ``on_total(n)`` of the number of captions in the file,
        ``progress(n)`` of each batch done (embedded, or skipped as already
        there). The file is read through once first, so one that turns out
        unreadable halfway is refused before anything is imported; each batch
        is committed as it goes, so an interrupted import keeps what it did and
        the same command finishes it."""
        file = CaptionFile(path, fmt)
        n_good, n_bad = file.count()
        if not n_good and not n_bad:
            raise CaptionFileError(f"{path}: no captions found")
        # the second pass meets the same malformed entries and reports them
        entries = file.entries(on_bad) if on_bad else file.entries()
        with self._writing():
            imported = self._add_captions(path, entries, n_good, progress, on_total)
        return {"imported": imported, "duplicates": n_good - imported, "malformed": n_bad,
                "not_utf8": file.not_utf8, "total": self.store.count_captions()}

    def import_labels(self, labels: list[str], templates: Iterable[str] = DEFAULT_TEMPLATES,
                      source: str = "labels") -> dict:
        """Import class labels as captions, the way zero-shot classifiers are
        built (CLIP's prompt ensembles): each label's vector is the mean of its
        embeddings in every template (``"a photo of a {}."``), its text is the
        first template filled in, and its ``image`` field holds the label, so
        ``caption(path)`` names the label of an image. Labels already imported
        from ``source`` are kept as they are."""
        templates = check_templates(templates)
        labels = list(dict.fromkeys(str(x).strip() for x in labels if str(x).strip()))
        if not labels:
            raise CaptionFileError("no labels given")
        pairs = [(label, templates[0].format(label)) for label in labels]

        def vectors(rows: list[tuple[str | None, str]]):
            names = [name for name, _ in rows]
            total = sum(self.encoder.encode_texts([t.format(n) for n in names]) for t in templates)
            vecs = total / np.linalg.norm(total, axis=1, keepdims=True).clip(1e-12)
            return vecs.astype(np.float32), (self.querybank.text_bias(vecs) if self.querybank is not None else None)

        with self._writing():
            imported = self._add_captions(source, pairs, len(pairs), None, None, vectors=vectors, resolve=False)
        return {"imported": imported, "duplicates": len(pairs) - imported, "templates": len(templates),
                "total": self.store.count_captions()}

    def _add_captions(self, path, pairs: Iterable, n_pairs: int, progress: Callable | None,
                      on_total: Callable | None, batch: int = 256, vectors: Callable | None = None,
                      resolve: bool = True) -> int:
        source = str(Path(path).resolve()) if resolve else str(path)
        vectors = vectors or (lambda rows: self._caption_vectors([c for _, c in rows]))
        if on_total:
            on_total(n_pairs)
        imported = 0
        for chunk in _batched(pairs, batch):
            fresh = self.store.new_captions(source, chunk)
            if fresh:
                vecs, biases = vectors(fresh)
                self.store.add_captions(fresh, vecs, source, biases)
                imported += len(fresh)
            if progress:
                progress(len(chunk))
        self._index("captions")
        return imported

    def _caption_vectors(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(stored vectors, query-bank biases or None) of gallery captions."""
        vecs = self.encoder.encode_texts(texts)
        return vecs, (self.querybank.text_bias(vecs) if self.querybank is not None else None)

    # -- upgrading ----------------------------------------------------------------
    def upgrade(self, progress: Callable | None = None, on_total: Callable | None = None) -> dict:
        """Bring an index built with an earlier version of its model (one with
        the same image side, see :func:`same_image_side`) up to this version in
        place: every caption is embedded again (the text side changed), every
        image's bias is computed again from its stored vector (the query bank
        may have changed), all in one transaction with the new version, so a
        run killed midway leaves the index as it was. Image files are not read
        and region tokens stay. The FAISS indexes are rebuilt afterwards.
        ``on_total(n)`` hears of the items to rewrite, ``progress(n)`` of each
        batch. Open the engine with ``upgrade=True``."""
        old = self.pending_upgrade
        summary = {"from": old, "to": self.encoder.version, "images": 0, "captions": 0}
        if old is None:
            return {**summary, "upgraded": False}
        bank = self.querybank
        with self._writing(check_current=False):
            meta = self.store.get_meta()
            if meta.get("model_version") == self.encoder.version:  # another process did it while we waited
                self.pending_upgrade = None
                return {**summary, "upgraded": False}
            if meta.get("model_version") != old:
                raise ModelMismatch(f"the index in {self.index_dir} changed version while waiting "
                                    f"({meta.get('model_version')}); open it again")
            if on_total:
                on_total(self.store.count_images() + self.store.count_captions())
            n_img, n_cap = self.store.rewrite_items(
                self.encoder.dim, bank.image_bias if bank is not None else None, self._caption_vectors,
                {"model_version": self.encoder.version, "image_side": self.encoder.image_side()},
                progress=progress)
            self.pending_upgrade = None
            self._indexes.clear()
            for name in ("images", "captions"):
                self._index(name)
        log.info("upgraded %s from %s to %s: %d images re-scored, %d captions re-embedded",
                 self.index_dir, old, self.encoder.version, n_img, n_cap)
        return {**summary, "images": n_img, "captions": n_cap, "upgraded": True}

    # -- queries ----------------------------------------------------------------
    def _allowed(self, under: str | None):
        if under is None:
            return None
        folder = os.path.abspath(os.fspath(under))
        return self.store.image_ids_under(folder)

    def _tokens(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Region tokens of indexed images, from the memory-mapped store."""
        if self.tokens is None:
            return {}
        retries = 2
        while True:
            slots, filename = self.store.token_slots(ids)
            self._follow_token_file(filename or TOKENS_DEFAULT_FILE)
            try:
                arrays = self.tokens.get(list(slots.values()))
                return dict(zip(slots.keys(), arrays))
            except (FileNotFoundError, TokenStoreDamaged):  # compacted again between the read and the open?
                if retries == 0:
                    raise
                retries -= 1

    def _follow_token_file(self, filename: str | None = None) -> None:
        """Switch to the token file the database names (``filename`` when the
        caller read it already): another process may have compacted the store."""
        if self.tokens is None:
            return
        filename = filename or self.store.get_meta().get(TOKEN_FILE_KEY, TOKENS_DEFAULT_FILE)
        if filename != self.tokens.path.name:
            self.tokens = TokenStore(self.index_dir, self.tokens.shape, filename)

    def _drop_stale_token_files(self) -> None:
        """Delete token files the database no longer names (the one a compaction
        replaced, or what a killed one left). Call with the writer lock held: a
        search still reading a deleted file keeps its open map, or retries."""
        keep = {self.tokens.path.name, self.tokens.sums_path.name}
        for stale in [*self.index_dir.glob("tokens*.f16"), *self.index_dir.glob("tokens*.f16.crc"),
                      *self.index_dir.glob("tokens*.f16.*tmp")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)

    def _compact_tokens(self) -> None:
        """Rewrite the token store without the slots of removed or re-embedded
        images once they are the larger part of it (and at least
        :data:`COMPACT_MIN_DEAD_SLOTS`). Call with the writer lock held."""
        if self.tokens is None:
            return
        ids, slots = self.store.live_token_slots()
        dead = self.tokens.n_slots - len(ids)
        if dead < max(COMPACT_MIN_DEAD_SLOTS, len(ids)):
            return
        old = self.tokens.path
        m = re.fullmatch(r"tokens-(\d+)\.f16", old.name)
        name = f"tokens-{int(m.group(1)) + 1 if m else 1}.f16"
        try:
            new = self.tokens.compact_into(name, slots)
        except (OSError, TokenStoreDamaged) as exc:  # housekeeping: the index stays as it was
            log.warning("token store not compacted (%s); it stays as it was", exc)
            return
        self.store.switch_token_file(name, ids)
        self.tokens = new
        self._drop_stale_token_files()
        log.info("token store compacted: %d live slots kept, %d dead dropped (%s -> %s)", len(ids), dead,
                 old.name, name)

    def _recall(self, name: str, query: np.ndarray, n: int, allowed: np.ndarray | None = None,
                leave_out: int | None = None) -> tuple[list[int], np.ndarray, dict]:
        """The top ``n`` of ``images`` or ``captions`` for one FAISS query
        vector: (ids, recall scores, their store rows). Rows removed by another
        process since the FAISS file was read are dropped, and so is
        ``leave_out``. An index of 8-bit or product codes is asked for more
        candidates (its spec's ``rescore`` times), which are re-scored exactly
        from the stored float vectors."""
        index = self._index(name)
        fetch = n + (leave_out is not None)
        if not index.exact_scores:
            fetch *= int(index.spec.params.get("rescore", RESCORE_FACTOR))
        with self._faiss_rw.read():
            scores, ids = index.search(query, fetch, allowed)
        rows = (self.store.image_rows if name == "images" else self.store.caption_rows)(
            ids[0][ids[0] >= 0].tolist())
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if int(i) in rows and int(i) != leave_out]
        if found and not index.exact_scores:
            got = [i for i, _ in found]
            vecs = np.stack([np.frombuffer(rows[i].embedding, np.float32) for i in got])
            bias = np.array([np.nan if rows[i].bias is None else rows[i].bias for i in got], np.float32)
            exact = self._gallery_vectors(name, vecs, bias) @ np.asarray(query, np.float32).reshape(-1)
            found = [(got[j], float(exact[j])) for j in np.argsort(-exact, kind="stable")]
        found = found[:n]
        return [i for i, _ in found], np.array([s for _, s in found], np.float32), rows

    def _candidates(self, rows: dict, ids: list[int]) -> list[ImageCandidate]:
        """Reranker inputs for ``ids``, whose rows are already loaded."""
        toks = self._tokens(ids)
        return [ImageCandidate(i, np.frombuffer(rows[i].embedding, np.float32), toks.get(i),
                               load=(lambda p=rows[i].path: decode_image(p, PIXEL_RERANK_SIZE).image)) for i in ids]

    def search(self, query: str, k: int = 10, rerank: bool = True, rerank_k: int | None = None,
               under: str | None = None) -> list[ImageHit]:
        """Text -> images."""
        query = _check_query(query)
        _check_k(k)
        qvec = self.encoder.encode_texts([query])[0]
        rerank_k = self._rerank_k(rerank, rerank_k)
        n = max(k, rerank_k)
        allowed = self._allowed(under)
        if allowed is not None and len(allowed) == 0:
            return []
        ids, scores, rows = self._recall("images", self._query_vectors(qvec), n, allowed)
        ids, scores, final, head = self._rerank_head(
            ids, scores, rerank_k,
            lambda head_ids: self.reranker.score_text_images(query, qvec, self._candidates(rows, head_ids)))
        return [
            ImageHit(rank + 1, float(final[rank]), rows[i].path, int(i), float(scores[rank]), rank < head)
            for rank, i in enumerate(ids[:k])
        ]

    def _query_image(self, image_path: str | os.PathLike) -> ImageCandidate:
        path = os.path.abspath(os.fspath(image_path))
        row = self.store.image_by_path(path)
        if row is not None:
            try:
                toks = self._tokens([row.id]).get(row.id)
                return ImageCandidate(row.id, np.frombuffer(row.embedding, np.float32), toks,
                                      load=lambda: decode_image(path, PIXEL_RERANK_SIZE).image)
            except TokenStoreDamaged as exc:  # embed the file again, as if it were not indexed
                _warn_damaged(exc)
        try:
            decoded = decode_image(path, self.encoder.input_size)
        except BadImage as exc:
            raise ImageUnusable(f"{path}: cannot use this image ({exc})", exc.reason, exc.detail) from None
        vecs, toks = self.encoder.encode_images_with_tokens([self.encoder.prepare(decoded.image)])
        return ImageCandidate(None if row is None else row.id, vecs[0], None if toks is None else toks[0],
                              load=lambda: decoded.image)

    def similar(self, image_path: str | os.PathLike, k: int = 10, under: str | None = None) -> list[ImageHit]:
        """Image -> similar images (the query image itself is left out)."""
        _check_k(k)
        q = self._query_image(image_path)
        allowed = self._allowed(under)
        if allowed is not None:
            allowed = allowed[allowed != (q.id if q.id is not None else -1)]
            if len(allowed) == 0:
                return []
        ids, scores, rows = self._recall("images", self._query_vectors(q.embedding, corrected=False), k, allowed,
                                         leave_out=q.id)
        return [ImageHit(r + 1, float(s), rows[i].path, i, float(s), False) for r, (i, s) in enumerate(zip(ids, scores))]

    def image_file(self, image_id: int) -> IndexedFile | None:
        """What the index recorded of an image's file (to check it is still the
        file that was indexed), or None when the id is not in the index."""
        row = self.store.image_rows([int(image_id)]).get(int(image_id))
        return None if row is None else IndexedFile(row.id, row.path, row.size, row.sha256)

    def image_path(self, image_id: int) -> str | None:
        """Path of an indexed image, or None when the id is not in the index."""
        rows = self.store.image_rows([int(image_id)])
        return rows[int(image_id)].path if int(image_id) in rows else None

    def similar_id(self, image_id: int, k: int = 10, under: str | None = None) -> list[ImageHit]:
        path = self.image_path(image_id)
        if path is None:
            raise QueryError(f"no image with id {image_id} in the index")
        return self.similar(path, k=k, under=under)

    def caption(self, image_path: str | os.PathLike, k: int = 5, rerank: bool = True,
                rerank_k: int | None = None) -> list[CaptionHit]:
        """Image -> best captions from the imported collection."""
        _check_k(k)
        if self.store.count_captions() == 0:
            raise QueryError("no captions imported yet; run: xmr captions import FILE")
        q = self._query_image(image_path)
        rerank_k = self._rerank_k(rerank, rerank_k)
        n = max(k, rerank_k)
        ids, scores, rows = self._recall("captions", self._query_vectors(q.embedding), n)

        def score(head_ids):
            embs = np.stack([np.frombuffer(rows[i].embedding, np.float32) for i in head_ids])
            return self.reranker.score_image_texts(q, [rows[i].text for i in head_ids], embs)

        ids, scores, final, head = self._rerank_head(ids, scores, rerank_k, score)
        return [
            CaptionHit(r + 1, float(final[r]), rows[i].text, int(i), rows[i].source, rows[i].image_name,
                       float(scores[r]), r < head)
            for r, i in enumerate(ids[:k])
        ]

    def _rerank_k(self, rerank: bool, rerank_k: int | None) -> int:
        """How many recalled items to rerank (0: none): none without a reranker
        or when ``rerank`` is off; ``rerank_k`` when given; else the
        reranker's default (0 for one that measured no gain over recall)."""
        if not rerank or self.reranker is None:
            return 0
        return self.reranker.default_k if rerank_k is None else rerank_k

    def _rerank_head(self, ids: list[int], scores: np.ndarray, rerank_k: int, score_fn):
        """Rerank the first ``rerank_k`` recalled items; the rest keep recall order.

        Returns (ids, recall scores, final scores, number reranked) in the new order.
        """
        head = min(rerank_k, len(ids))
        final = scores.astype(np.float64)
        if head == 0:
            return ids, scores, final, 0
        try:
            rr = fuse(score_fn(ids[:head]), scores[:head], self.reranker.fusion_weight)
        except TokenStoreDamaged as exc:  # recall order until `xmr index` rebuilds the tokens
            _warn_damaged(exc)
            return ids, scores, final, 0
        order = rerank_order(scores[:head], rr)
        ids = [ids[j] for j in order] + ids[head:]
        scores = np.concatenate([scores[:head][order], scores[head:]])
        final = np.concatenate([rr[order], final[head:]])
        return ids, scores, final, head

    # -- facts ------------------------------------------------------------------
    def status(self) -> dict:
        meta = self.store.get_meta()
        # an index waiting for `xmr upgrade` is described from its records alone
        images = self._index("images") if self.pending_upgrade is None else None
        return {
            "index_dir": str(self.index_dir),
            "database": self.store.location.shown,
            "images": self.store.count_images(),
            "captions": self.store.count_captions(),
            "model": meta.get("model"),
            "model_version": meta.get("model_version"),
            "dim": int(meta.get("dim", self.encoder.dim)),
            "index_type": images.spec.factory if images else meta.get("images_factory"),
            "search_params": images.spec.params if images else None,
            "gpu": images.use_gpu if images else None,
            "reranker": self.reranker.name if self.reranker else None,
            "rerank_k": self._rerank_k(True, None),  # how many a search reranks unless told
            "querybank": ({"beta": self.querybank.beta, "alpha": self.querybank.alpha}
                          if self.querybank is not None else None),
            "text_memory": (self.querybank.memory.as_dict()
                            if self.querybank is not None and self.querybank.memory is not None else None),
            "schema_version": int(meta.get("schema_version", 0)),
            "token_store": self._token_store_status(),
            "upgrade_needed": (None if self.pending_upgrade is None else
                               f"built with version {self.pending_upgrade}: run xmr upgrade"),
        }

    def _token_store_status(self) -> dict | None:
        if self.tokens is None:
            return None
        self._follow_token_file()
        slots = self.tokens.n_slots
        info = {"file": self.tokens.path.name, "mb": round(slots * self.tokens.slot_bytes / 2**20, 1),
                "live_slots": self.store.count_token_slots(), "slots": slots}
        beyond = self.store.count_token_slots(from_slot=slots)
        if beyond:
            info["problem"] = (f"{beyond} images point beyond the end of {self.tokens.path.name} (truncated or "
                               "deleted): their searches are not reranked; run xmr index on their folders to "
                               "rebuild the tokens")
        return info


def _open_store(where: Location) -> Store:
    from sqlalchemy.exc import DatabaseError, OperationalError

    try:
        return Store(where)
    except (StoreError, DatabaseChoiceError) as exc:  # a newer schema, one without a migration, no driver
        raise IndexUnusable(str(exc)) from None
    except DatabaseError as exc:
        detail = database_error_detail(exc)
        db = where.shown.removeprefix("sqlite:///")
        if where.dialect == "postgresql":
            hint = ("check that the server is running and reachable, and that the user may create a schema in "
                    "that database (its password comes from the URL, PGPASSWORD or ~/.pgpass)"
                    if isinstance(exc, OperationalError) else "check the server's log")
        elif "not a database" in detail or "malformed" in detail:
            hint = ("it is damaged or not an xmr index; move it aside and index again "
                    "(your images are untouched), or choose another folder with --index")
        else:
            hint = "check that the folder exists and is readable and writable by you, or choose another with --index"
        raise IndexUnusable(f"{db}: cannot open the index database ({detail}); {hint}") from None


def _remember(index_dir: Path, store: Store) -> Store:
    """Record a new PostgreSQL index's schema in its folder; where another
    process recorded one first, drop this (empty) schema and open that one."""
    winner = remember(index_dir, store.location)
    if winner == store.location:
        return store
    with store.engine.begin() as conn:
        drop_schema(conn, store.location)
    store.close()
    return _open_store(winner)


def _saved_generation(path: Path) -> int | None:
    """The generation recorded beside a FAISS file, or None."""
    try:
        return json.loads(path.with_name(path.name + ".json").read_text()).get("generation")
    except (OSError, ValueError):
        return None


def _warn_damaged(exc: TokenStoreDamaged) -> None:
    log.warning("region tokens damaged (%s): results in recall order, not reranked; run xmr index on the "
                "indexed folders to rebuild them", exc)


def _own_reranker(enc: DualEncoder) -> Reranker | None:
    model = getattr(enc, "reranker_model", None)
    if model is None:
        return None
    from reranker.xmr import XmrReranker

    return XmrReranker(model, enc.text_states, enc.fusion_weight, default_k=enc.default_rerank_k)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` consecutive items (the last may be shorter)."""
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch
