"""A run killed with SIGKILL mid-way leaves a consistent index; the next run finishes."""

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


def counts(idx):
    """(images, images whose tokens are on disk, images with a bad vector) of
    the index in folder ``idx``, read through its store (SQLite or PostgreSQL)."""
    from indexer.database import locate
    from indexer.store import ImageRow, Store

    st = Store(locate(idx, os.environ.get("XMR_DATABASE"), create=False))
    try:
        with st.session() as s:
            n_img = s.scalar(select(func.count(ImageRow.id)))
            slots = list(s.scalars(select(ImageRow.token_slot).where(ImageRow.token_slot.is_not(None))))
            bad = s.scalar(select(func.count(ImageRow.id)).where(func.length(ImageRow.embedding) != 256 * 4))
    finally:
        st.close()
    tokens = idx / "tokens.f16"
    on_disk = tokens.stat().st_size // (98 * 128 * 2) if tokens.exists() else 0
    n_tok = sum(1 for s in slots if s < on_disk)
    return n_img, n_tok, bad


def wait_for_rows(proc, idx, n: int = 4, timeout: float = 300) -> None:
    """Wait until the indexing run ``proc`` has committed ``n`` images."""
    from indexer.database import index_exists

    deadline = time.time() + timeout
    while time.time() < deadline:
        if index_exists(idx):
            try:
                if counts(idx)[0] >= n:
                    return
            except SQLAlchemyError:  # the tables are not there yet
                pass
        if proc.poll() is not None:
            pytest.fail("indexing ended before it could be stopped: " + proc.stderr.read().decode()[-500:])
        time.sleep(0.2)
    pytest.fail(f"indexing committed fewer than {n} images in {timeout} s")


@pytest.mark.slow
def test_sigkill_during_indexing_then_resume(tmp_path, mini_images):
    idx = tmp_path / "index"
    cmd = [sys.executable, "-m", "retrieval.cli", "--index", str(idx), "index", "-q", "--batch-size", "4",
           "--model", "xmr-lite2", str(mini_images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_rows(proc, idx)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_img, n_tok, bad = counts(idx)
    assert 0 < n_img < 32, n_img
    assert n_tok == n_img and bad == 0  # every image fully present (row, vector, tokens) or absent

    from click.testing import CliRunner

    from retrieval.cli import cli

    res = CliRunner().invoke(cli, ["--index", str(idx), "index", str(mini_images)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"unchanged {n_img}" in res.output and f"added {32 - n_img}" in res.output
    res = CliRunner().invoke(cli, ["--index", str(idx), "status", "--json"])
    import json

    assert json.loads(res.output)["images"] == 32
    n_img, n_tok, bad = counts(idx)
    assert (n_img, n_tok, bad) == (32, 32, 0)


@pytest.mark.slow
def test_ctrl_c_stops_indexing_cleanly(tmp_path, mini_images):
    """Ctrl-C (SIGINT to the whole process group, decoding worker processes
    included) stops the run at once with one line and no tracebacks; what was
    indexed stays whole."""
    idx = tmp_path / "index"
    cmd = [sys.executable, "-m", "retrieval.cli", "--index", str(idx), "index", "-q", "--batch-size", "4", "--model", "xmr-lite2",
           "--processes", "2", str(mini_images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_rows(proc, idx)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "Traceback" not in err, err
    n_img, n_tok, bad = counts(idx)
    assert 0 < n_img < 32 and n_tok == n_img and bad == 0
