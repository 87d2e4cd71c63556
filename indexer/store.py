"""The metadata store: SQLite or PostgreSQL through SQLAlchemy 2.0
(``indexer.database`` says which and connects).

The database is the source of truth. Each image row carries its embedding (and the
slot of its region tokens, written to the token store before the row) so that
a row and its vector are written in one transaction: a run killed at any point leaves every image fully present
or absent. The FAISS files are derived from these rows. Every transaction
that changes a collection bumps its generation and journals the ids it added
and removed (``changes``), so a FAISS file recorded at an older generation is
brought up to date by replaying the journal instead of being rebuilt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    String,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .database import Location, connect, create_schema
from .walk import outermost

SCHEMA_VERSION = 4
TOKEN_FILE_KEY = "tokens_file"  # meta: the token store's current file (absent: tokens.f16)


# Paths per query of Store.iter_rows_under: each adds one LIKE to an OR chain,
# and SQLite refuses expressions deeper than 1,000.
PREFIXES_PER_QUERY = 250


class StoreError(Exception):
    pass


# 64-bit ids (a PostgreSQL INTEGER stops at 2^31); on SQLite an INTEGER
# PRIMARY KEY is the 64-bit rowid already, and only that spelling makes it one.
Id = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {int: BigInteger}


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    path: Mapped[str] = mapped_column(String, unique=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int]
    height: Mapped[int]
    added_at: Mapped[float]
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    # slot of the image's region tokens in the token store (indexer/tokens.py)
    token_slot: Mapped[int | None]
    # the model's score correction of this item (query-bank normalisation), if any
    bias: Mapped[float | None]


class CaptionRow(Base):
    __tablename__ = "captions"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    text: Mapped[str]
    source: Mapped[str]
    image_name: Mapped[str | None]
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    bias: Mapped[float | None]
    # duplicate checks of an import ask for (source, text) a batch at a time
    __table_args__ = (Index("ix_captions_source_text", "source", "text"),)


class ChangeRow(Base):
    """Journal of ids added to or removed from a collection, per generation."""

    __tablename__ = "changes"
    seq: Mapped[int] = mapped_column(Id, primary_key=True)
    collection: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int]
    item_id: Mapped[int]
    added: Mapped[bool]
    __table_args__ = (Index("ix_changes_collection_generation", "collection", "generation"),)


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]


def _migrate_1_to_2(conn) -> None:
    """Schema 2: per-item score bias (the journal table is created by create_all)."""
    conn.execute(text("ALTER TABLE images ADD COLUMN bias FLOAT"))
    conn.execute(text("ALTER TABLE captions ADD COLUMN bias FLOAT"))


def _migrate_2_to_3(conn) -> None:
    """Schema 3: the token file may be renamed by compaction (meta ``tokens_file``).
    Nothing to change in the tables; the version keeps an older xmr, which
    would look for tokens.f16 only, from opening such an index."""


def _migrate_3_to_4(conn) -> None:
    """Schema 4: captions indexed by (source, text), so an import checks a batch
    for duplicates without loading every caption of its file (the index on
    source alone is covered by it)."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_captions_source_text ON captions (source, text)"))
    conn.execute(text("DROP INDEX IF EXISTS ix_captions_source"))


# Ordered migrations: MIGRATIONS[v](connection) upgrades a store at schema
# version v to v + 1.
MIGRATIONS: dict[int, Callable] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}


def _rows_by_path(session, paths: list[str], *columns, chunk: int = 900) -> dict[str, tuple]:
    """path -> ``columns`` of the image rows at those ``paths``, asked a chunk
    of paths at a time (SQLite caps the number of bound parameters)."""
    out = {}
    for i in range(0, len(paths), chunk):
        q = select(ImageRow.path, *columns).where(ImageRow.path.in_(paths[i : i + chunk]))
        for path, *rest in session.execute(q):
            out[path] = tuple(rest)
    return out


def _copy_in(s: Session, table, rows: list[dict], with_ids: bool) -> list[int]:
    """PostgreSQL: write ``rows`` (dicts with the same keys) into ``table``
    with one COPY, in the session's transaction; with ``with_ids``, each row
    first gets an id drawn from the table's sequence, returned in row order.
    (COPY takes a 100,000-row batch several times faster than a multi-row
    INSERT ... RETURNING: benchmarks/RESULTS.md.)"""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    if not rows:
        return []
    conn = s.connection()
    ids: list[int] = []
    if with_ids:
        seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table.name}).scalar()
        ids = list(conn.execute(text("SELECT nextval(:s) FROM generate_series(1, :n)"),
                                {"s": seq, "n": len(rows)}).scalars())
    keys = list(rows[0])
    columns = (["id"] if with_ids else []) + keys
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    cursor = conn.connection.driver_connection.cursor()
    try:
        with cursor.copy(statement) as copy:
            for n, row in enumerate(rows):
                values = [row[k] for k in keys]
                copy.write_row([ids[n], *values] if with_ids else values)
    except psycopg.Error as exc:  # as SQLAlchemy's own statements raise it (IntegrityError, OperationalError...)
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from None
    finally:
        cursor.close()
    return ids


def _to_blob(vec: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(vec, dtype=dtype).tobytes()


class Store:
    """All reads and writes of the database of one index.

    ``where`` is a :class:`~indexer.database.Location` or the path of an
    SQLite file."""

    def __init__(self, where: Location | str | os.PathLike, schema_version: int = SCHEMA_VERSION,
                 migrations: dict[int, Callable] | None = None):
        self.location = where if isinstance(where, Location) else Location.sqlite(Path(where))
        self.schema_version = schema_version
        self.migrations = MIGRATIONS if migrations is None else migrations
        self.engine = connect(self.location)
        try:
            self._init_schema()
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def dialect(self) -> str:
        return self.location.dialect

    @property
    def path(self) -> str:
        """Where the store is, for messages (no password)."""
        return self.location.shown.removeprefix("sqlite:///")

    def _init_schema(self) -> None:
        with self.engine.begin() as conn:
            create_schema(conn, self.location)
            have = set(inspect(conn).get_table_names(schema=self.location.schema))
            if "meta" not in have:
                Base.metadata.create_all(conn)
                conn.execute(insert(MetaRow.__table__), [
                    {"key": "schema_version", "value": str(self.schema_version)},
                    # present from the start, so that a writer locks them (SELECT ... FOR UPDATE)
                    {"key": "generation_images", "value": "0"},
                    {"key": "generation_captions", "value": "0"}])
                return
            row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).first()
            version = int(row[0]) if row else 1
            if version > self.schema_version:
                raise StoreError(
                    f"{self.path} was written by a newer xmr (schema {version} > {self.schema_version}); upgrade xmr"
                )
            if version == self.schema_version:
                missing = sorted(set(Base.metadata.tables) - have)
                if missing:
                    raise StoreError(f"{self.path}: the table{'s' if len(missing) > 1 else ''} "
                                     f"{', '.join(missing)} of this index {'are' if len(missing) > 1 else 'is'} "
                                     "gone; restore the database from a backup, or index again in a new folder")
                return
            while version < self.schema_version:
                if version not in self.migrations:
                    raise StoreError(f"{self.path}: no migration from schema {version}; rebuild the index")
                self.migrations[version](conn)
                version += 1
            Base.metadata.create_all(conn)  # tables a migration brings (the journal)
            if row is None:
                conn.execute(insert(MetaRow.__table__).values(key="schema_version", value=str(version)))
            else:
                conn.execute(update(MetaRow).where(MetaRow.key == "schema_version").values(value=str(version)))

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- facts about the index ------------------------------------------------
    def get_meta(self) -> dict[str, str]:
        with self.session() as s:
            return {k: v for k, v in s.execute(select(MetaRow.key, MetaRow.value))}

    def set_meta(self, **values) -> None:
        with self.session() as s, s.begin():
            for k, v in values.items():
                s.merge(MetaRow(key=k, value=str(v)))

    def bump_generation(self, s: Session, name: str, added=(), removed=()) -> int:
        """Advance ``name``'s generation inside transaction ``s`` and journal its changes."""
        key = f"generation_{name}"
        cur = s.get(MetaRow, key, with_for_update=True)  # PostgreSQL: concurrent writers queue here
        gen = int(cur.value) + 1 if cur else 1
        s.merge(MetaRow(key=key, value=str(gen)))
        journal = [{"collection": name, "generation": gen, "item_id": int(i), "added": False} for i in removed]
        journal += [{"collection": name, "generation": gen, "item_id": int(i), "added": True} for i in added]
        if journal and self.dialect == "postgresql":
            _copy_in(s, ChangeRow.__table__, journal, with_ids=False)
        elif journal:
            s.execute(insert(ChangeRow.__table__), journal)  # one executemany, not an ORM flush per row
        return gen

    def generation(self, name: str) -> int:
        return int(self.get_meta().get(f"generation_{name}", "0"))

    def changes(self, name: str, after: int, upto: int) -> tuple[list[int], list[int]] | None:
        """Net (added ids, removed ids) of ``name`` between two generations, or
        None when the journal no longer reaches back to ``after``."""
        with self.session() as s:
            floor = s.get(MetaRow, f"journal_floor_{name}")
            if floor is not None and after < int(floor.value):
                return None
            q = (select(ChangeRow.item_id, ChangeRow.added)
                 .where(ChangeRow.collection == name, ChangeRow.generation > after, ChangeRow.generation <= upto)
                 .order_by(ChangeRow.seq))
            last: dict[int, bool] = {}
            for item_id, added in s.execute(q):
                last[item_id] = added
        # every touched id leaves the index; those whose last change was an add come back
        return [i for i, a in last.items() if a], list(last)

    def pending_changes(self, name: str, after: int) -> int:
        """How many journal entries of ``name`` lie past generation ``after``."""
        with self.session() as s:
            q = select(func.count(ChangeRow.seq)).where(ChangeRow.collection == name, ChangeRow.generation > after)
            return s.scalar(q) or 0

    def prune_changes(self, name: str, upto: int) -> None:
        """Forget the journal up to ``upto`` (a FAISS file at that generation is on disk)."""
        with self.session() as s, s.begin():
            s.execute(delete(ChangeRow).where(ChangeRow.collection == name, ChangeRow.generation <= upto))
            key = f"journal_floor_{name}"
            cur = s.get(MetaRow, key)
            if cur is None or int(cur.value) < upto:
                s.merge(MetaRow(key=key, value=str(upto)))

    # -- images ---------------------------------------------------------------
    def count_images(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(ImageRow.id))) or 0

    def states_of(self, paths: list[str], chunk: int = 900) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, sha256) of those ``paths`` that are indexed."""
        with self.session() as s:
            return _rows_by_path(s, paths, ImageRow.id, ImageRow.size, ImageRow.mtime_ns, ImageRow.sha256,
                                 chunk=chunk)

    def iter_rows_under(self, prefixes: Iterable[str], batch: int = 10_000) -> Iterator[tuple[int, str, str]]:
        """Stream (id, path, sha256) of the images at any of these paths or
        below these folders, each once (none for no prefixes). Rows come in id
        order within each group of PREFIXES_PER_QUERY prefixes: SQLite caps
        the depth of an expression, so a long list (``xmr index *.jpg``) is
        asked in groups."""
        roots = outermost(p.rstrip(os.sep) or os.sep for p in prefixes)
        for g in range(0, len(roots), PREFIXES_PER_QUERY):
            group = roots[g : g + PREFIXES_PER_QUERY]
            under = ImageRow.path.in_(group)
            for prefix in group:
                under = under | ImageRow.path.startswith(prefix.rstrip(os.sep) + os.sep, autoescape=True)
            q = select(ImageRow.id, ImageRow.path, ImageRow.sha256).where(under).order_by(ImageRow.id).limit(batch)
            last = 0
            with self.session() as s:
                while True:
                    rows = s.execute(q.where(ImageRow.id > last)).all()
                    if not rows:
                        break
                    yield from (tuple(r) for r in rows)
                    last = rows[-1][0]

    def find_by_hash(self, sha256: str) -> list[tuple[int, str]]:
        with self.session() as s:
            return list(s.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.sha256 == sha256)))

    def write_images(
        self,
        new: list[dict],
        moved: list[tuple[int, str, int, int]],
        touched: list[tuple[int, int, int]],
        removed: list[int],
    ) -> list[int]:
        """Apply one batch of changes in a single transaction.

        new: dicts with path, size, mtime_ns, sha256, width, height, embedding
        (float32 vector) and optional token_slot and bias; an existing row at
        the same path is replaced. moved: (id, new path, size, mtime_ns). touched: (id, size,
        mtime_ns). removed: ids. Returns the ids of the new rows.
        """
        ids = []
        gone = list(removed)
        with self.session() as s, s.begin():
            if removed:
                s.execute(delete(ImageRow).where(ImageRow.id.in_(removed)))
            for image_id, path, size, mtime in moved:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(path=path, size=size, mtime_ns=mtime))
            for image_id, size, mtime in touched:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(size=size, mtime_ns=mtime))
            if new:
                replaced = ImageRow.path.in_([n["path"] for n in new])
                gone += list(s.scalars(select(ImageRow.id).where(replaced)))
                s.execute(delete(ImageRow).where(replaced))
                # one executemany for the batch (an ORM flush per row cost about
                # 0.4 ms an image: a GPU feeding thousands a second would wait on it)
                now = time.time()
                table = ImageRow.__table__
                rows = [{"path": n["path"], "size": n["size"], "mtime_ns": n["mtime_ns"], "sha256": n["sha256"],
                         "width": n["width"], "height": n["height"], "added_at": now,
                         "embedding": _to_blob(n["embedding"], np.float32), "token_slot": n.get("token_slot"),
                         "bias": None if n.get("bias") is None else float(n["bias"])} for n in new]
                if self.dialect == "postgresql":
                    ids = _copy_in(s, table, rows, with_ids=True)
                else:  # Core, no ORM bulk machinery; ids by path (RETURNING in row order costs SQLite 10% more)
                    by_path = dict(s.execute(insert(table).returning(table.c.path, table.c.id), rows).all())
                    ids = [by_path[n["path"]] for n in new]
            if new or gone or moved:
                self.bump_generation(s, "images", added=ids, removed=gone)
        return ids

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Remove images at these paths or below these folders; returns how many."""
        ids = [image_id for image_id, _path, _sha in self.iter_rows_under(paths)]
        if ids:
            self.write_images([], [], [], ids)
        return len(ids)

    def image_rows(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = list(ids)
        with self.session() as s:
            return {r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}

    def image_by_path(self, path: str) -> ImageRow | None:
        with self.session() as s:
            return s.scalar(select(ImageRow).where(ImageRow.path == path))

    def image_ids_under(self, folder: str) -> np.ndarray:
        folder = folder.rstrip(os.sep)
        with self.session() as s:
            q = select(ImageRow.id).where(ImageRow.path.startswith(folder + os.sep, autoescape=True))
            return np.fromiter((r for r in s.scalars(q)), dtype=np.int64)

    def token_slots(self, ids: Iterable[int]) -> tuple[dict[int, int], str | None]:
        """({id: token slot}, the token file those slots are in (None: the
        default file)), read in one transaction."""
        ids = list(ids)
        with self.session() as s, s.begin():
            q = select(ImageRow.id, ImageRow.token_slot).where(ImageRow.id.in_(ids), ImageRow.token_slot.is_not(None))
            slots = {i: slot for i, slot in s.execute(q)}
            row = s.get(MetaRow, TOKEN_FILE_KEY)
            return slots, (row.value if row else None)

    def count_token_slots(self, from_slot: int = 0) -> int:
        """Images whose region tokens are in the token store (at slot
        ``from_slot`` or later)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.token_slot >= from_slot)))

    def live_token_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of every image with tokens, ordered by slot (int64 arrays)."""
        with self.session() as s:
            q = select(ImageRow.id, ImageRow.token_slot).where(ImageRow.token_slot.is_not(None)).order_by(
                ImageRow.token_slot)
            pairs = np.fromiter((v for row in s.execute(q) for v in row), dtype=np.int64)
        return pairs[0::2].copy(), pairs[1::2].copy()

    def switch_token_file(self, filename: str, ids: np.ndarray, batch: int = 10_000) -> None:
        """Give ``ids[k]`` token slot ``k`` and name ``filename`` as the token
        file, in one transaction."""
        with self.session() as s, s.begin():
            for b in range(0, len(ids), batch):
                s.execute(update(ImageRow), [{"id": int(i), "token_slot": b + k}
                                             for k, i in enumerate(ids[b : b + batch])])
            s.merge(MetaRow(key=TOKEN_FILE_KEY, value=filename))

    def iter_vectors(self, table: str, dim: int, batch: int = 4096,
                     ids: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Stream (ids, float32 vectors, biases) of ``images`` or ``captions``
        in id order; a bias never computed is NaN. ``ids`` restricts the
        stream to those rows (missing ones are left out)."""
        model = {"images": ImageRow, "captions": CaptionRow}[table]
        wanted = None if ids is None else sorted(set(int(i) for i in ids))
        last, pos = 0, 0
        with self.session() as s:
            while True:
                q = select(model.id, model.embedding, model.bias)
                if wanted is None:
                    q = q.where(model.id > last).order_by(model.id).limit(batch)
                else:
                    if pos >= len(wanted):
                        return
                    q = q.where(model.id.in_(wanted[pos : pos + batch])).order_by(model.id)
                    pos += batch
                rows = s.execute(q).all()
                if not rows:
                    if wanted is None:
                        return
                    continue
                row_ids = np.array([r[0] for r in rows], dtype=np.int64)
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                bias = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float32)
                yield row_ids, vecs, bias
                last = int(row_ids[-1])

    def rewrite_items(self, dim: int, image_bias: Callable[[np.ndarray], np.ndarray] | None,
                      caption_vectors: Callable[[list[str]], tuple[np.ndarray, np.ndarray | None]],
                      meta: dict[str, str], batch: int = 512,
                      progress: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Rewrite every item and then ``meta``, all in one transaction (an
        error anywhere leaves the store as it was): each image keeps its vector
        and gets the bias ``image_bias(vectors)`` (None: no bias); each caption
        gets ``caption_vectors(texts) -> (vectors, biases or None)``. Returns
        (images, captions) rewritten. Ids stay; each collection moves to a new
        generation that its journal does not reach, so every FAISS copy of it,
        in any process, is rebuilt rather than replayed."""
        counts = []
        with self.session() as s, s.begin():
            for name, model, column in (("images", ImageRow, ImageRow.embedding),
                                        ("captions", CaptionRow, CaptionRow.text)):
                last, n = 0, 0
                while True:
                    rows = s.execute(select(model.id, column).where(model.id > last)
                                     .order_by(model.id).limit(batch)).all()
                    if not rows:
                        break
                    ids = [r[0] for r in rows]
                    if model is ImageRow:
                        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
                        bias = image_bias(vecs) if image_bias is not None else None
                        values = [{"id": i, "bias": None if bias is None else float(bias[k])}
                                  for k, i in enumerate(ids)]
                    else:
                        vecs, bias = caption_vectors([r[1] for r in rows])
                        values = [{"id": i, "embedding": _to_blob(vecs[k], np.float32),
                                   "bias": None if bias is None else float(bias[k])} for k, i in enumerate(ids)]
                    s.execute(update(model), values)
                    n += len(rows)
                    last = ids[-1]
                    if progress:
                        progress(len(rows))
                counts.append(n)
                gen = self.bump_generation(s, name)
                s.execute(delete(ChangeRow).where(ChangeRow.collection == name))
                s.merge(MetaRow(key=f"journal_floor_{name}", value=str(gen)))
            for key, value in meta.items():
                s.merge(MetaRow(key=key, value=str(value)))
        return counts[0], counts[1]

    # -- captions -------------------------------------------------------------
    def count_captions(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(CaptionRow.id))) or 0

    def new_captions(self, source: str, pairs: Iterable[tuple[str | None, str]],
                     chunk: int = 900) -> list[tuple[str | None, str]]:
        """The ``(image name, text)`` pairs not yet imported from ``source``,
        each once, in the order given (asked a chunk of texts at a time)."""
        pairs = list(dict.fromkeys(pairs))
        texts = list(dict.fromkeys(t for _, t in pairs))
        have = set()
        with self.session() as s:
            for i in range(0, len(texts), chunk):
                q = select(CaptionRow.image_name, CaptionRow.text).where(
                    CaptionRow.source == source, CaptionRow.text.in_(texts[i : i + chunk]))
                have.update((n, t) for n, t in s.execute(q))
        return [p for p in pairs if p not in have]

    def add_captions(self, rows: list[tuple[str | None, str]], vectors: np.ndarray, source: str,
                     biases: np.ndarray | None = None) -> int:
        with self.session() as s, s.begin():
            if rows:
                table = CaptionRow.__table__
                values = [{"text": caption, "source": source, "image_name": image_name,
                           "embedding": _to_blob(vec, np.float32), "bias": None if biases is None else float(biases[n])}
                          for n, ((image_name, caption), vec) in enumerate(zip(rows, vectors))]
                if self.dialect == "postgresql":
                    added = _copy_in(s, table, values, with_ids=True)
                else:
                    added = list(s.scalars(insert(table).returning(table.c.id), values))
                self.bump_generation(s, "captions", added=added)
        return len(rows)

    def caption_rows(self, ids: Iterable[int]) -> dict[int, CaptionRow]:
        ids = list(ids)
        with self.session() as s:
            return {r.id: r for r in s.scalars(select(CaptionRow).where(CaptionRow.id.in_(ids)))}
