"""GET /docs: Swagger UI whose every asset the service serves, behind the same tokens."""

import re
from pathlib import Path

import flask_swagger_ui
import pytest

from server import create_app
from settings import Config
from test_metrics import samples

TOKEN = "docs-token-0123456789"
SWAGGER_UI = Path(flask_swagger_ui.__file__).with_name("dist")  # the files the package ships


def assets(page: str) -> list:
    """Return every URL the page's HTML loads (scripts, style sheets, icons)."""
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_the_page_and_every_asset_it_names_are_served_from_the_service(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.content_type.startswith("text/html")
    page = response.get_data(as_text=True)
    assert '"url": "/openapi.json"' in page
    assert "http" not in page  # no CDN, no other host
    urls = assets(page)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(urls)
    for url in urls:
        assert url.startswith("/docs/"), url  # no CDN, no other host
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.get_data() == (SWAGGER_UI / url.removeprefix("/docs/")).read_bytes(), url
        asset.close()


def test_the_browser_may_load_nothing_from_elsewhere(client):
    for path in ("/docs", "/docs/swagger-ui.css"):
        response = client.get(path)
        response.close()
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy
        assert "http" not in policy


def test_a_missing_or_escaping_asset_is_a_json_404(client):
    for path in ("/docs/nothing.js", "/docs/../server.py", "/docs/%2e%2e/settings.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "message" in response.get_json()


def test_the_docs_need_a_token_when_openapi_json_does(redis_client):
    client = create_app(Config(api_tokens=(TOKEN,)), redis_client).test_client()
    for path in ("/openapi.json", "/docs", "/docs/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 401, path
        response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, path
        response.close()


@pytest.mark.parametrize("path", ["/docs", "/docs/swagger-ui.css"])
def test_the_docs_are_not_counted_as_streamed_lists(client, path):
    before = samples(client)[("customers_streamed_lists_in_progress", ())]
    response = client.get(path, buffered=False)
    assert samples(client)[("customers_streamed_lists_in_progress", ())] == before
    response.close()
