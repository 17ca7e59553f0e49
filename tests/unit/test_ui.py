"""The playground's page and the offline API docs over a fake engine: what is served, from where, and to whom.

The page's behaviour in a real browser is tested in tests/e2e/test_playground.py."""

from __future__ import annotations

import base64
import glob
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffusers_api.http.ui import STATIC_DIR
from support.apps import make_client
from support.envelopes import GRASS
from support.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
# src="..." / href="..." in HTML, and the URL strings Swagger UI's and ReDoc's pages hand to their scripts
_URLS = re.compile(r"""(?:src|href)=["']([^"']+)["']|(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""")


def referenced_urls(html: str) -> list[str]:
    return [a or b for a, b in _URLS.findall(html)]


def is_local(url: str) -> bool:
    return (url.startswith("/") and not url.startswith("//")) or url.startswith("data:")


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_the_page_and_every_file_it_loads_come_from_the_server(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    urls = referenced_urls(page.text)
    assert {"/ui/static/playground.js", "/ui/static/playground.css", "/docs", "/redoc"} <= set(urls)
    assert [url for url in urls if not is_local(url)] == []
    for url in urls:
        if url.startswith("/ui/static/"):
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert asset.headers["cache-control"] == "no-cache"  # an upgrade is never hidden by a cached script


def test_the_script_calls_only_the_servers_own_routes() -> None:
    script = (STATIC_DIR / "playground.js").read_text()
    assert "http://" not in script
    assert "https://" not in script
    called = set(re.findall(r"""(?:api|fetch)\(\s*[`"'](/[^`"'$?]*)""", script))
    assert called == {"/health", "/v1/models", "/v1/schedulers", "/v1/jobs", "/v1/jobs/"}


def test_post_slash_stays_the_legacy_api(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/", json=GRASS)
    assert response.status_code == 200
    assert base64.b64decode(response.json()["image_base64"]).startswith(b"\x89PNG")
    assert engine.requests[0].prompt == "realistic field of grass"


def test_the_page_needs_no_key_but_the_api_behind_it_does(engine: FakeEngine) -> None:
    with make_client(engine, api_key="s3cret") as secured:
        assert secured.get("/").status_code == 200
        assert secured.get("/ui/static/playground.js").status_code == 200
        assert secured.post("/", json=GRASS).status_code == 401
        assert secured.get("/v1/schedulers").status_code == 401


def test_an_unknown_static_file_is_404(client: TestClient) -> None:
    assert client.get("/ui/static/nope.js").status_code == 404


def test_the_page_stays_out_of_the_openapi_document(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "get" not in spec["paths"]["/"]
    assert "/ui" not in spec["paths"]
    assert "/v1/schedulers" in spec["paths"]


def test_schedulers_wait_for_a_model(client: TestClient) -> None:
    response = client.get("/v1/schedulers")  # the fake engine has no model store
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "NOT_READY"


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_load_only_local_files(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200
    urls = referenced_urls(page.text)
    assert any(url.endswith(".js") for url in urls), urls  # the parse found the script
    assert [url for url in urls if not is_local(url)] == []
    for url in urls:
        assert client.get(url).status_code == 200, url


def test_redoc_may_not_fetch_images_from_elsewhere(client: TestClient) -> None:
    # ReDoc's bundle shows Redocly's logo from their CDN; the policy blocks it (the browser test sees it blocked).
    assert client.get("/redoc").headers["content-security-policy"] == "img-src 'self' data: blob:"


def test_the_package_ships_every_static_file() -> None:
    """pyproject's package-data must cover each file under http/static, or a wheel would ship without it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["diffusers_api.http"]
    files = {path.relative_to(STATIC_DIR.parent).as_posix() for path in STATIC_DIR.rglob("*") if path.is_file()}
    shipped = {name for pattern in patterns for name in glob.glob(pattern, root_dir=STATIC_DIR.parent)}
    assert {"static/index.html", "static/playground.js", "static/playground.css"} <= files
    assert files - shipped == set()
