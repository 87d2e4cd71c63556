"""Where an index's metadata lives: SQLite in the index folder (the default)
or a PostgreSQL server, and how to connect to it.

An index folder always holds the files derived from or beside the metadata
(the region-token store, the FAISS files). Its rows live either in
``xmr.db`` in the folder or in a PostgreSQL schema of their own; the folder
then holds ``database.json``, which names the server (never its password)
and the schema, so later commands find the rows without being told again.
One PostgreSQL database can hold many indexes, one schema each.

PostgreSQL is reached through psycopg (``pip install 'xmr-search[postgresql]'``),
imported only when a PostgreSQL index is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

SQLITE_FILE = "xmr.db"
RECORD_FILE = "database.json"
ENV_VAR = "XMR_DATABASE"


class DatabaseChoiceError(Exception):
    """The database asked for cannot hold this index (another backend, a
    malformed URL, a missing driver); the message says what to do."""


@dataclass(frozen=True)
class Location:
    """Where one index's rows are: ``url`` (SQLAlchemy form, with any
    password given) and, for PostgreSQL, the ``schema`` that holds them."""

    url: str
    schema: str | None = None

    @classmethod
    def sqlite(cls, path: str | os.PathLike) -> "Location":
        return cls(f"sqlite:///{path}")

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    @property
    def shown(self) -> str:
        """The location without a password, fit for logs and status."""
        shown = make_url(self.url).render_as_string(hide_password=True)
        return f"{shown} (schema {self.schema})" if self.schema else shown

    def lock_key(self, purpose: str) -> int:
        """A signed 64-bit PostgreSQL advisory lock key of this index, one per
        ``purpose`` ("writer": the writer lock; "schema": creating the schema)."""
        digest = hashlib.blake2b(f"{self.schema or self.url}/{purpose}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)


def normalise_url(url: str) -> str:
    """A PostgreSQL URL in the form SQLAlchemy opens with psycopg 3
    (``postgresql://`` and ``postgres://`` name it; other drivers are kept)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseChoiceError(f"{url!r} is not a database URL; write it as postgresql://USER@HOST:PORT/DATABASE "
                                  "(or leave --database and XMR_DATABASE unset for SQLite in the index folder)") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend != "postgresql":
        raise DatabaseChoiceError(f"{parsed.render_as_string(hide_password=True)}: xmr keeps its rows in SQLite "
                                  "(the default, in the index folder) or PostgreSQL (postgresql://USER@HOST/DB)")
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _same_server(a: str, b: str) -> bool:
    ua, ub = make_url(a), make_url(b)
    return (ua.host or "", ua.port or 5432, ua.database, ua.query.get("host")) == \
           (ub.host or "", ub.port or 5432, ub.database, ub.query.get("host"))


def index_exists(index_dir: Path) -> bool:
    return (index_dir / SQLITE_FILE).is_file() or (index_dir / RECORD_FILE).is_file()


def read_record(index_dir: Path) -> Location | None:
    path = index_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Location(normalise_url(data["url"]), data["schema"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatabaseChoiceError(f"{path} is damaged ({exc}); it names the PostgreSQL schema of this index: "
                                  "restore it from a backup, or index again in a new folder") from None


def remember(index_dir: Path, location: Location) -> Location:
    """Write ``location`` (a new PostgreSQL index, its schema created) as the
    folder's record, unless another process wrote one first: then that one is
    the index's location, and is returned. Written whole under a temporary
    name, then linked into place, which fails where a record exists."""
    index_dir.mkdir(parents=True, exist_ok=True)
    record = index_dir / RECORD_FILE
    tmp = index_dir / f".{RECORD_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    bare = make_url(location.url)._replace(password=None).render_as_string(hide_password=False)
    tmp.write_text(json.dumps({"url": bare, "schema": location.schema}, indent=1) + "\n")
    try:
        os.link(tmp, record)
    except FileExistsError:
        return _with_password(read_record(index_dir), location.url)
    finally:
        tmp.unlink(missing_ok=True)
    return location


def _with_password(location: Location, url: str) -> Location:
    """``location`` with the password of ``url`` (a record never holds one)."""
    password = make_url(url).password
    if password is None or make_url(location.url).password is not None:
        return location
    return Location(make_url(location.url).set(password=password).render_as_string(hide_password=False),
                    location.schema)


def locate(index_dir: Path, requested: str | None, create: bool) -> Location | None:
    """Where the index in ``index_dir`` keeps its rows.

    ``requested`` is the database asked for (``--database`` or
    ``XMR_DATABASE``; None or '' for SQLite). An existing index stays where
    it is and refuses another database; a new one goes where asked (with
    ``create``): a new PostgreSQL index gets a schema name of its own, which
    the caller creates and then records with :func:`remember`. None: there is
    no index and ``create`` is false.
    """
    requested = normalise_url(requested) if requested else None
    record = read_record(index_dir)
    sqlite_file = index_dir / SQLITE_FILE
    if record is not None:
        if requested and not _same_server(requested, record.url):
            raise DatabaseChoiceError(
                f"the index in {index_dir} keeps its rows in {record.shown}, not in "
                f"{make_url(requested).render_as_string(hide_password=True)}; pass that database or none "
                f"(its folder remembers it), or use another folder with --index")
        return _with_password(record, requested) if requested else record
    if sqlite_file.is_file():
        if requested:
            raise DatabaseChoiceError(
                f"the index in {index_dir} keeps its rows in SQLite ({sqlite_file}), not in "
                f"{make_url(requested).render_as_string(hide_password=True)}; unset --database and XMR_DATABASE "
                "to use it, or build a PostgreSQL index in another folder with --index")
        return Location.sqlite(sqlite_file)
    if not create:
        return None
    if not requested:
        return Location.sqlite(sqlite_file)
    return Location(requested, f"xmr_{uuid.uuid4().hex[:16]}")


def connect(location: Location) -> Engine:
    """An SQLAlchemy engine on ``location``, each connection set up for xmr
    (SQLite: WAL, a busy timeout; PostgreSQL: the index's schema first on the
    search path)."""
    if location.dialect == "sqlite":
        engine = create_engine(location.url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise DatabaseChoiceError("PostgreSQL needs the psycopg driver: pip install 'xmr-search[postgresql]' "
                                  "(or pip install 'psycopg[binary]')") from None
    engine = create_engine(location.url, pool_pre_ping=True)
    schema = location.schema

    @event.listens_for(engine, "connect")
    def _search_path(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute(f'SET search_path TO "{schema}"')
        cur.close()
        dbapi_conn.commit()

    return engine


def drop_schema(conn, location: Location) -> None:
    """Drop a PostgreSQL index's schema and all it holds."""
    conn.execute(text(f'DROP SCHEMA IF EXISTS "{location.schema}" CASCADE'))


def create_schema(conn, location: Location) -> None:
    """Create the index's PostgreSQL schema if missing, holding a transaction
    lock so that two processes opening a new index do it once."""
    if location.dialect != "postgresql":
        return
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": location.lock_key("schema")})
    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{location.schema}"'))
