"""One writer at a time per index folder, across processes.

SQLite already serialises row changes, but an index folder also holds files
written beside the database: the region-token store (slots are handed out by
the file's length) and the FAISS files (written to a temporary name, then
renamed). Two processes doing that at once can hand out one slot twice or
rename a half-written file into place. :class:`IndexLock` is an advisory
``flock`` on ``write.lock`` in the folder: commands that change the index
hold it for their whole run, a second one waits for it, and readers that
merely refresh a FAISS file skip the refresh while a writer holds it (the
journal in SQLite keeps them correct without it).

The lock is re-entrant within one :class:`IndexLock` object and released by
the operating system when a process dies, so a killed run never leaves the
index locked. Where ``fcntl`` does not exist (Windows) it does nothing. An
index whose rows are in PostgreSQL uses the server's advisory lock instead
(:class:`AdvisoryLock`), which holds across machines.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import text

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = "write.lock"


class FileLock:
    """An exclusive ``flock`` on a file, written with the holder's pid."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self, wait: bool, on_wait: Callable[[str], None] | None) -> bool:
        if fcntl is None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if not wait:  # a folder this process cannot write to: nothing to refresh there either
                return False
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return False
                if on_wait:
                    on_wait(self.holder())
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class AdvisoryLock:
    """A PostgreSQL session advisory lock on ``key``, held on a connection of
    its own for as long as the lock is held: writers on any machine that
    reach the server exclude each other, and the server releases the lock when
    the holder's connection ends (a killed process included)."""

    def __init__(self, engine, key: int):
        self.engine = engine
        self.key = key
        self._conn = None

    def holder(self) -> str:
        q = text("SELECT a.pid, a.client_addr, a.application_name FROM pg_locks l "
                 "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                 "AND l.classid = ((:k >> 32) & 4294967295)::oid AND l.objid = (:k & 4294967295)::oid AND l.objsubid = 1")
        try:
            with self.engine.connect() as conn:
                row = conn.execute(q, {"k": self.key}).first()
        except Exception:  # the holder's name is a courtesy; waiting does not depend on it
            return ""
        if row is None:
            return ""
        return f"PostgreSQL backend pid {row[0]} from {row[1] or 'a local socket'}"

    def acquire(self, wait: bool, on_wait: Callable[[str], None] | None) -> bool:
        conn = self.engine.connect()
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            if not got:
                if not wait:
                    conn.close()
                    return False
                if on_wait:
                    on_wait(self.holder())
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            conn.commit()  # session locks outlive transactions; leave none open
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return True

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            conn.commit()
        finally:
            conn.close()


class IndexLock:
    """The writer lock of one index: a :class:`FileLock` on ``write.lock`` in
    its folder, or ``primitive`` (an :class:`AdvisoryLock` where the rows are
    in PostgreSQL). Re-entrant within one object, shared by its threads."""

    def __init__(self, directory: str | os.PathLike, primitive: FileLock | AdvisoryLock | None = None):
        self.primitive = primitive or FileLock(Path(directory) / LOCK_NAME)
        self._mutex = threading.RLock()
        self._depth = 0

    def holder(self) -> str:
        """Who holds (or last held) the lock ("pid 123"), or ''."""
        return self.primitive.holder()

    @contextmanager
    def hold(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
        """Hold the lock for the ``with`` block; yields whether it is held.

        ``wait=False`` yields False at once where another process holds it.
        ``on_wait(holder)`` is called once before blocking behind another process.
        """
        if not self._mutex.acquire(blocking=wait):  # another thread of this process writes
            yield False
            return
        try:
            if self._depth == 0 and not self.primitive.acquire(wait, on_wait):
                yield False
                return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.primitive.release()
        finally:
            self._mutex.release()


class ReadWriteLock:
    """Many readers or one writer, among the threads of one process."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
