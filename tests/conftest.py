import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# XMR_DATASETS: where the datasets are when not beside the checkout (the GPU machine stages them elsewhere)
DATASETS = Path(os.environ.get("XMR_DATASETS", ROOT.parent / "shared" / "datasets"))


def _dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI needs ../shared/datasets beside the checkout")
        pytest.skip(f"{path} not found (clone the project beside ../shared/datasets to run this test)")
    return path


@pytest.fixture(scope="session")
def mini_dataset() -> Path:
    return _dataset("flickr8k-mini")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return _dataset("flickr8k")


@pytest.fixture(scope="session")
def zeroshot() -> Path:
    return _dataset("zeroshot")


@pytest.fixture
def mini_images(mini_dataset, tmp_path) -> Path:
    """A private copy of the 32 full-size mini images (tests may move or delete them)."""
    dst = tmp_path / "photos"
    shutil.copytree(mini_dataset / "Flicker8k_Dataset", dst)
    return dst


def make_image(path: Path, color=(200, 30, 30), size=(64, 48), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((color, size))) % 2**32)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# -- databases ------------------------------------------------------------------
# Tests marked ``databases`` run twice: on SQLite (the default) and on a real
# PostgreSQL server that the session starts (tests/postgres.py). The server is
# chosen through XMR_DATABASE, as a user would, so subprocesses follow too.
# ``sqlite_only`` keeps a marked module's test to SQLite (it opens the file).

BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("databases") is None:
        return
    only = metafunc.definition.get_closest_marker("sqlite_only")
    metafunc.parametrize("backend", BACKENDS[:1] if only else BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a database on a PostgreSQL server started for this session."""
    from tests.postgres import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed; CI installs it (.ci/run: apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        url = server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        pytest.fail(f"could not start a PostgreSQL server for the tests: {exc}")
    yield url
    server.stop()


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """"sqlite" or "postgresql": where the indexes of this test keep their rows."""
    name = getattr(request, "param", "sqlite")
    if name == "postgresql":
        monkeypatch.setenv("XMR_DATABASE", request.getfixturevalue("postgres_url"))
    else:
        monkeypatch.delenv("XMR_DATABASE", raising=False)
    return name


@pytest.fixture
def store_at(backend, tmp_path):
    """``store_at(name)``: where a bare Store of this test's backend goes (an
    SQLite file, or a PostgreSQL schema of its own); the same name, the same place."""
    from indexer.database import locate

    def where(name: str = "x"):
        if backend == "sqlite":
            return tmp_path / f"{name}.db"
        return locate(tmp_path / name, os.environ["XMR_DATABASE"], create=True)

    return where


def index_store(index_dir: Path, **kw):
    """The Store of the index in ``index_dir`` on this test's backend
    (XMR_DATABASE), created where missing as Engine.open would."""
    from indexer.database import locate, remember
    from indexer.store import Store

    index_dir.mkdir(parents=True, exist_ok=True)
    where = locate(index_dir, os.environ.get("XMR_DATABASE"), create=True)
    store = Store(where, **kw)
    if where.schema:
        remember(index_dir, where)
    return store
