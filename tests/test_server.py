"""The HTTP API with FastAPI's test client (fake encoder, generated images)."""

import io

import pytest
from fastapi.testclient import TestClient

from retrieval.engine import Engine
from retrieval.server import create_app

from .conftest import make_image
from .fakes import COLORS, FakeEncoder

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    photos = root / "photos"
    for name, color in COLORS.items():
        make_image(photos / f"{name}.jpg", color, size=(80, 60))
    (root / "secret.txt").write_text("top secret")
    eng = Engine.open(root / "index", create=True, reranker="none", encoder=FakeEncoder())
    eng.index([photos])
    caps = root / "caps.txt"
    caps.write_text("a red thing\na green thing\na blue thing\n")
    eng.import_captions(caps)
    return eng, root


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served[0]))


def test_search_returns_ids_and_paths(client, served):
    r = client.get("/api/search", params={"q": "red", "k": 3})
    assert r.status_code == 200
    hits = r.json()
    assert len(hits) == 3 and hits[0]["path"].endswith("red.jpg")
    assert {"rank", "score", "path", "id"} <= set(hits[0])


def test_similar_image_thumb_status(client):
    hits = client.get("/api/search", params={"q": "blue", "k": 1}).json()
    image_id = hits[0]["id"]
    sim = client.get(f"/api/similar/{image_id}", params={"k": 2}).json()
    assert len(sim) == 2 and all(h["id"] != image_id for h in sim)
    img = client.get(f"/api/image/{image_id}")
    assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"
    th = client.get(f"/api/thumb/{image_id}")
    assert th.status_code == 200 and th.headers["content-type"] == "image/jpeg"
    st = client.get("/api/status").json()
    assert st["images"] == 4 and st["captions"] == 3
    caps = client.get(f"/api/captions/{image_id}", params={"k": 1}).json()
    assert caps[0]["caption"] == "a blue thing"


def test_caption_upload(client, tmp_path):
    p = make_image(tmp_path / "g.png", COLORS["green"], fmt="PNG")
    r = client.post("/api/caption", files={"file": ("g.png", p.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()[0]["caption"] == "a green thing"


def test_large_jpeg_upload_is_decoded_at_reduced_size(client, monkeypatch):
    """An upload over the decoded-pixel limit is captioned when it is a JPEG
    (decoded once, at the model's size); a PNG that size is refused with 422."""
    from PIL import Image

    from indexer import decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 250_000)
    big = Image.new("RGB", (2000, 1600), COLORS["green"])
    jpg, png = io.BytesIO(), io.BytesIO()
    big.save(jpg, "JPEG", quality=80)
    big.save(png, "PNG")
    r = client.post("/api/caption", files={"file": ("big.jpg", jpg.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()[0]["caption"] == "a green thing"
    r = client.post("/api/caption", files={"file": ("big.png", png.getvalue(), "image/png")})
    assert r.status_code == 422 and "decompression bomb" in r.json()["error"]
    assert ".upload" not in r.json()["error"]  # the server's temporary path is not shown


def test_bad_uploads_are_refused_with_json(client):
    r = client.post("/api/caption", files={"file": ("x.jpg", b"not an image at all", "image/jpeg")})
    assert r.status_code == 415 and "error" in r.json()
    r = client.post("/api/caption", files={"file": ("x.jpg", b"", "image/jpeg")})
    assert r.status_code == 422
    big = io.BytesIO(b"\xff\xd8" + b"0" * (21 * 1024 * 1024))
    r = client.post("/api/caption", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413


@pytest.mark.parametrize("url", [
    "/api/image/999999", "/api/thumb/-1", "/api/image/..%2F..%2Fsecret.txt", "/api/image/../../secret.txt",
    "/static/../secret.txt", "/static/%2e%2e/%2e%2e/secret.txt", "/api/image/%2e%2e%2fsecret.txt",
])
def test_no_file_outside_the_index_can_be_read(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422)
    assert b"top secret" not in r.content


def test_bounds_and_errors_are_json(client):
    for params in ({"q": "red", "k": 0}, {"q": "red", "k": 101}, {"q": ""}, {}):
        r = client.get("/api/search", params=params)
        assert r.status_code == 422 and "error" in r.json()
    r = client.get("/api/search", params={"q": "   "})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    assert client.get("/api/similar/424242").status_code == 404


def test_page_and_assets_are_local(client):
    html = client.get("/").text
    assert "<input" in html and "http" not in html.replace("http-equiv", "")  # no external CDN
    assert client.get("/static/app.js").status_code == 200


def test_concurrent_requests(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return client.get("/api/search", params={"q": ["red", "green", "blue"][i % 3], "k": 2}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(40))) == {200}


def test_sees_images_added_by_another_process(tmp_path):
    photos = tmp_path / "photos"
    make_image(photos / "red.jpg", COLORS["red"])
    served_engine = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=FakeEncoder())
    served_engine.index([photos])
    client = TestClient(create_app(served_engine))
    assert client.get("/api/status").json()["images"] == 1
    # a second engine on the same index stands in for `xmr index` in another process
    other = Engine.open(tmp_path / "index", reranker="none", encoder=FakeEncoder())
    make_image(photos / "blue.jpg", COLORS["blue"])
    other.index([photos])
    hits = client.get("/api/search", params={"q": "blue", "k": 2}).json()
    assert hits[0]["path"].endswith("blue.jpg") and len(hits) == 2
