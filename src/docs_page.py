"""GET /docs: Swagger UI over /openapi.json, every asset served by the service itself.

Swagger UI's scripts, styles and icons are the distribution files that the flask-swagger-ui
package ships in its dist folder, so the page works on a host without internet access; a
Content-Security-Policy keeps the browser from loading or sending anything elsewhere.
"""

import json
from pathlib import Path

import flask_swagger_ui
from flask import Response, send_from_directory

ASSETS = Path(flask_swagger_ui.__file__).with_name("dist")
SETTINGS = {
    "url": "/openapi.json",
    "dom_id": "#swagger-ui",
    "deepLinking": True,
    # Swagger UI would send the document to a validator on the internet.
    "validatorUrl": None,
}
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Customers service API</title>
  <link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>window.onload = function () { window.ui = SwaggerUIBundle(SETTINGS); };</script>
</body>
</html>
""".replace("SETTINGS", json.dumps(SETTINGS))
# The page's one inline script starts Swagger UI; Swagger UI sets styles inline and shows
# images as data: URLs.
POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
          "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")


def page() -> Response:
    """Answer the page that starts Swagger UI over /openapi.json."""
    return Response(PAGE, mimetype="text/html", headers={"Content-Security-Policy": POLICY})


def asset(path: str) -> Response:
    """Answer one file of Swagger UI's distribution."""
    response = send_from_directory(ASSETS, path)
    response.headers["Content-Security-Policy"] = POLICY
    return response


def install(app) -> None:
    """Serve Swagger UI at GET /docs and its files under /docs/."""
    if not (ASSETS / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"flask-swagger-ui no longer ships Swagger UI in {ASSETS}")
    app.add_url_rule("/docs", "docs", page)
    app.add_url_rule("/docs/<path:path>", "docs_asset", asset)
