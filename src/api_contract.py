"""The OpenAPI document of the service, kept beside the code and served at /openapi.json."""

from pathlib import Path

from flask import Response

DOCUMENT = Path(__file__).with_name("openapi.json")


def install(app) -> None:
    """Serve the OpenAPI document at GET /openapi.json."""
    text = DOCUMENT.read_text()
    app.add_url_rule("/openapi.json", "openapi",
                     lambda: Response(text, mimetype="application/json"))
