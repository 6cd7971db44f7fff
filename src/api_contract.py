"""The OpenAPI document of the service, kept beside the code and served at /openapi.json."""

import copy
import json
from pathlib import Path

from flask import Response

DOCUMENT = Path(__file__).with_name("openapi.json")


def document(tokens: bool) -> dict:
    """Return the document as this service answers: bearer security only when it has tokens."""
    spec = json.loads(DOCUMENT.read_text())
    if tokens:
        return spec
    # No token applies: no security requirement, scheme or 401 a client (or a fuzzer) would
    # take for a promise.
    open_spec = copy.deepcopy(spec)
    open_spec["security"] = []
    # An empty map rather than none: without one, Swagger UI 5.34 (GET /docs) leaves the
    # path-level parameters' $refs unresolved, and "try it" has no customer_id field.
    open_spec["components"]["securitySchemes"] = {}
    open_spec["components"]["responses"].pop("Unauthorized", None)
    for item in open_spec["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
                operation.get("responses", {}).pop("401", None)
    return open_spec


def install(app, tokens: bool) -> None:
    """Serve the document at GET /openapi.json."""
    text = json.dumps(document(tokens), indent=2, ensure_ascii=False) + "\n"
    app.add_url_rule("/openapi.json", "openapi",
                     lambda: Response(text, mimetype="application/json"))
