"""A throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` from
the system's PostgreSQL (Debian: the ``postgresql`` package) in a temporary
directory, listening on 127.0.0.1 at a free port, trusted, stopped after."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (XMR_TEST_PG_BIN, PATH, or
    Debian's /usr/lib/postgresql/VERSION/bin), or None."""
    if os.environ.get("XMR_TEST_PG_BIN"):
        return Path(os.environ["XMR_TEST_PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold links to initdb alone
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster. PostgreSQL refuses to run as root: as root,
    the server runs as the ``postgres`` user (the Debian package makes it)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="xmr-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise RuntimeError(f"{' '.join(args)} failed: {res.stderr or res.stdout}")

    def start(self) -> str:
        """Start the server; returns the URL of its ``xmr`` database."""
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")
        self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "xmr")
        return f"postgresql://postgres@127.0.0.1:{self.port}/xmr"

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
