"""The metadata store: SQLite through SQLAlchemy 2.0.

SQLite is the source of truth. Each image row carries its embedding (and the
slot of its region tokens, written to the token store before the row) so that
a row and its vector are written in one transaction: a run killed at any point leaves every image fully present
or absent. The FAISS files are derived from these rows and rebuilt whenever
their recorded generation differs from the store's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Index,
    LargeBinary,
    String,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1


class StoreError(Exception):
    pass


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
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


class CaptionRow(Base):
    __tablename__ = "captions"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
    source: Mapped[str]
    image_name: Mapped[str | None]
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    __table_args__ = (Index("ix_captions_source", "source"),)


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]


# Ordered migrations: MIGRATIONS[v](connection) upgrades a store at schema
# version v to v + 1. Version 1 is the first released schema, so none exist yet.
MIGRATIONS: dict[int, Callable] = {}


def _to_blob(vec: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(vec, dtype=dtype).tobytes()


class Store:
    """All reads and writes of the SQLite database of one index."""

    def __init__(self, db_path: str | os.PathLike, schema_version: int = SCHEMA_VERSION,
                 migrations: dict[int, Callable] | None = None):
        self.path = Path(db_path)
        self.schema_version = schema_version
        self.migrations = MIGRATIONS if migrations is None else migrations
        self.engine = create_engine(f"sqlite:///{self.path}", connect_args={"check_same_thread": False})

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        self._init_schema()

    def _init_schema(self) -> None:
        with self.engine.begin() as conn:
            has_meta = conn.execute(text("SELECT name FROM sqlite_master WHERE name='meta'")).first()
            if not has_meta:
                Base.metadata.create_all(conn)
                conn.execute(MetaRow.__table__.insert().values(key="schema_version", value=str(self.schema_version)))
                return
            row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).first()
            version = int(row[0]) if row else 1
            if version > self.schema_version:
                raise StoreError(
                    f"{self.path} was written by a newer xmr (schema {version} > {self.schema_version}); upgrade xmr"
                )
            while version < self.schema_version:
                if version not in self.migrations:
                    raise StoreError(f"{self.path}: no migration from schema {version}; rebuild the index")
                self.migrations[version](conn)
                version += 1
            Base.metadata.create_all(conn)
            conn.execute(
                text("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', :v)"), {"v": str(version)}
            )

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

    def bump_generation(self, s: Session, name: str) -> None:
        key = f"generation_{name}"
        cur = s.get(MetaRow, key)
        s.merge(MetaRow(key=key, value=str(int(cur.value) + 1 if cur else 1)))

    def generation(self, name: str) -> int:
        return int(self.get_meta().get(f"generation_{name}", "0"))

    # -- images ---------------------------------------------------------------
    def count_images(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(ImageRow.id))) or 0

    def image_states(self, prefixes: Iterable[str]) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, sha256) of images under any of the prefixes."""
        out = {}
        with self.session() as s:
            for prefix in prefixes:
                q = select(ImageRow.path, ImageRow.id, ImageRow.size, ImageRow.mtime_ns, ImageRow.sha256)
                q = q.where((ImageRow.path == prefix) | ImageRow.path.startswith(prefix.rstrip(os.sep) + os.sep, autoescape=True))
                for path, *rest in s.execute(q):
                    out[path] = tuple(rest)
        return out

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
        (float32 vector) and optional token_slot; an existing row at the same path
        is replaced. moved: (id, new path, size, mtime_ns). touched: (id, size,
        mtime_ns). removed: ids. Returns the ids of the new rows.
        """
        ids = []
        with self.session() as s, s.begin():
            if removed:
                s.execute(delete(ImageRow).where(ImageRow.id.in_(removed)))
            for image_id, path, size, mtime in moved:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(path=path, size=size, mtime_ns=mtime))
            for image_id, size, mtime in touched:
                s.execute(update(ImageRow).where(ImageRow.id == image_id).values(size=size, mtime_ns=mtime))
            if new:
                s.execute(delete(ImageRow).where(ImageRow.path.in_([n["path"] for n in new])))
            for n in new:
                row = ImageRow(
                    path=n["path"], size=n["size"], mtime_ns=n["mtime_ns"], sha256=n["sha256"],
                    width=n["width"], height=n["height"], added_at=time.time(),
                    embedding=_to_blob(n["embedding"], np.float32), token_slot=n.get("token_slot"),
                )
                s.add(row)
                s.flush()
                ids.append(row.id)
            if new or removed or moved:
                self.bump_generation(s, "images")
        return ids

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Remove images at these paths or below these folders; returns how many."""
        states = self.image_states(paths)
        ids = [v[0] for v in states.values()]
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

    def token_slots(self, ids: Iterable[int]) -> dict[int, int]:
        ids = list(ids)
        with self.session() as s:
            q = select(ImageRow.id, ImageRow.token_slot).where(ImageRow.id.in_(ids), ImageRow.token_slot.is_not(None))
            return {i: slot for i, slot in s.execute(q)}

    def iter_vectors(self, table: str, dim: int, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, float32 vectors) of ``images`` or ``captions`` in id order."""
        model = {"images": ImageRow, "captions": CaptionRow}[table]
        last = 0
        with self.session() as s:
            while True:
                rows = s.execute(
                    select(model.id, model.embedding).where(model.id > last).order_by(model.id).limit(batch)
                ).all()
                if not rows:
                    return
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                yield ids, vecs
                last = int(ids[-1])

    # -- captions -------------------------------------------------------------
    def count_captions(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(CaptionRow.id))) or 0

    def existing_captions(self, source: str) -> set[tuple[str | None, str]]:
        """(image name, text) pairs already imported from ``source``."""
        with self.session() as s:
            q = select(CaptionRow.image_name, CaptionRow.text).where(CaptionRow.source == source)
            return {(n, t) for n, t in s.execute(q)}

    def add_captions(self, rows: list[tuple[str | None, str]], vectors: np.ndarray, source: str) -> int:
        with self.session() as s, s.begin():
            for (image_name, caption), vec in zip(rows, vectors):
                s.add(CaptionRow(text=caption, source=source, image_name=image_name,
                                 embedding=_to_blob(vec, np.float32)))
            if rows:
                self.bump_generation(s, "captions")
        return len(rows)

    def caption_rows(self, ids: Iterable[int]) -> dict[int, CaptionRow]:
        ids = list(ids)
        with self.session() as s:
            return {r.id: r for r in s.scalars(select(CaptionRow).where(CaptionRow.id.in_(ids)))}
