"""A run killed with SIGKILL mid-way leaves a consistent index; the next run finishes."""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest


def counts(db):
    """(images, images whose tokens are on disk, images with a bad vector)."""
    con = sqlite3.connect(db)
    try:
        n_img = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        slots = [r[0] for r in con.execute("SELECT token_slot FROM images WHERE token_slot IS NOT NULL")]
        bad = con.execute("SELECT COUNT(*) FROM images WHERE length(embedding) != 256 * 4").fetchone()[0]
    finally:
        con.close()
    tokens = db.parent / "tokens.f16"
    on_disk = tokens.stat().st_size // (98 * 128 * 2) if tokens.exists() else 0
    n_tok = sum(1 for s in slots if s < on_disk)
    return n_img, n_tok, bad


def wait_for_rows(proc, db, n: int = 4, timeout: float = 300) -> None:
    """Wait until the indexing run ``proc`` has committed ``n`` images."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.exists():
            try:
                if counts(db)[0] >= n:
                    return
            except sqlite3.Error:
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
    db = idx / "xmr.db"
    wait_for_rows(proc, db)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_img, n_tok, bad = counts(db)
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
    n_img, n_tok, bad = counts(db)
    assert (n_img, n_tok, bad) == (32, 32, 0)


@pytest.mark.slow
def test_ctrl_c_stops_indexing_cleanly(tmp_path, mini_images):
    """Ctrl-C (SIGINT to the whole process group, decoding worker processes
    included) stops the run at once with one line and no tracebacks; what was
    indexed stays whole."""
    import os

    idx = tmp_path / "index"
    cmd = [sys.executable, "-m", "retrieval.cli", "--index", str(idx), "index", "-q", "--batch-size", "4", "--model", "xmr-lite2",
           "--processes", "2", str(mini_images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    db = idx / "xmr.db"
    wait_for_rows(proc, db)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "Traceback" not in err, err
    n_img, n_tok, bad = counts(db)
    assert 0 < n_img < 32 and n_tok == n_img and bad == 0
