"""GET /docs: Swagger UI over /openapi.json, every asset served by the service itself.

The page and its scripts, styles and icons come from the flask-swagger-ui package (Swagger
UI's own distribution files), so the page works on a host without internet access; a
Content-Security-Policy keeps the browser from loading or sending anything elsewhere.
"""

from flask_swagger_ui import get_swaggerui_blueprint

PATH = "/docs"
SETTINGS = {
    "app_name": "Customers service API",
    # The standalone layout's top bar would load any document a reader types in.
    "layout": "BaseLayout",
    # Swagger UI would send the document to a validator on the internet.
    "validatorUrl": None,
}
# The page's one inline script starts Swagger UI; Swagger UI sets styles inline and shows
# images as data: URLs.
POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
          "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")


def _confine(response):
    """Keep every load and request of a docs response on the service's origin."""
    response.headers["Content-Security-Policy"] = POLICY
    return response


def install(app) -> None:
    """Serve Swagger UI at GET /docs and its assets under /docs/."""
    blueprint = get_swaggerui_blueprint(PATH, "/openapi.json", config=dict(SETTINGS))
    blueprint.after_request(_confine)
    app.register_blueprint(blueprint)
    # The blueprint serves the page at /docs/; /docs answers too, without a redirect.
    app.add_url_rule(PATH, endpoint=f"{blueprint.name}.show")
