"""Fuzz the API from its own OpenAPI schema: no request may cause a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from retrieval.engine import Engine
from retrieval.server import create_app

from .conftest import make_image
from .fakes import COLORS, FakeEncoder

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for name, color in COLORS.items():
        make_image(root / "photos" / f"{name}.jpg", color)
    eng = Engine.open(root / "index", create=True, reranker="none", encoder=FakeEncoder())
    eng.index([root / "photos"])
    caps = root / "c.txt"
    caps.write_text("red\ngreen\n")
    eng.import_captions(caps)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(eng))


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)
            ctype = response.headers.get("content-type", "")
            ctype = ctype[0] if isinstance(ctype, list) else ctype
            if response.status_code >= 400 and ctype.startswith("application/json"):
                assert "error" in response.json()

        check()
