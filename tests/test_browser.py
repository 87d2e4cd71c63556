"""The search page in real headless Chromium (Debian's package, driven by
Playwright): load, type a query, see thumbnails; a screenshot is saved to
test-artifacts/."""

import os
import shutil
import threading
import time

import pytest

from retrieval.engine import Engine
from retrieval.server import create_app

from .conftest import ROOT, make_image
from .fakes import COLORS, FakeEncoder
from .postgres import free_port

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def server(tmp_path):
    import uvicorn

    for name, color in COLORS.items():
        for j in range(3):
            make_image(tmp_path / "photos" / f"{name}{j}.jpg", tuple(max(0, c - 30 * j) for c in color), size=(120, 90))
    eng = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=FakeEncoder())
    eng.index([tmp_path / "photos"])
    caps = tmp_path / "c.txt"
    caps.write_text("a red square\na green square\na blue square\n")
    eng.import_captions(caps)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(eng), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", tmp_path
    srv.should_exit = True
    t.join(timeout=10)


def test_page_search_shows_thumbnails(server):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    url, tmp = server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#status:has-text('images')")
        page.fill("#q", "red")
        page.press("#q", "Enter")
        page.wait_for_selector("figure.hit img.thumb")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('img.thumb')).every(i => i.complete && i.naturalWidth > 0)")
        n = page.locator("figure.hit").count()
        first = page.locator("figure.hit img.thumb").first.get_attribute("title")
        page.locator("figure.hit").first.click()
        page.wait_for_selector("#detail-captions li")
        caption = page.locator("#detail-captions li").first.inner_text()
        page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
        # dropping an image file on the page looks up its captions
        blue = (tmp / "photos" / "blue0.jpg").read_bytes()
        page.evaluate(
            """async (bytes) => {
                const file = new File([new Uint8Array(bytes)], 'blue0.jpg', {type: 'image/jpeg'});
                const dt = new DataTransfer(); dt.items.add(file);
                window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            }""",
            list(blue),
        )
        page.wait_for_selector("#status:text-is('captions for blue0.jpg')")  # not the 'finding ...' one
        dropped = page.locator("#detail-captions li").first.inner_text()
        browser.close()
    assert n == 12 and "red" in first
    assert caption.startswith("a red square")
    assert dropped.startswith("a blue square"), dropped
    assert not errors, errors
