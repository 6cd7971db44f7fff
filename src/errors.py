"""Answer every error with one JSON shape: {"message": ...}."""

import logging

from flask import json
from redis.exceptions import ResponseError
from werkzeug.exceptions import HTTPException, InternalServerError, abort, default_exceptions

from database import UNAVAILABLE, Refusing, classified

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 2


def fail(status: int, message: str, headers: dict | None = None):
    """Stop the request with an HTTP error, a message for the client and extra headers."""
    if headers:
        error = default_exceptions[status](description=message)
        error.extra_headers = headers
        raise error
    abort(status, description=message)


def _json(status: int, message: str, headers=None):
    body = json.dumps({"message": message}) + "\n"
    return body, status, {**(headers or {}), "Content-Type": "application/json"}


def http_error(error: HTTPException):
    """Answer an HTTP error (404, 405, 413, ...) as JSON, keeping its headers."""
    headers = {name: value for name, value in error.get_headers()
               if name.lower() not in ("content-type", "content-length")}
    headers.update(getattr(error, "extra_headers", {}))
    return _json(error.code, error.description, headers)


def database_unavailable(error: Exception):
    """Answer a database outage with 503 and a hint of when to try again."""
    log.warning("database unavailable: %s: %s", type(error).__name__, error)
    return _json(503, f"{database_state(error)}; try again shortly",
                 {"Retry-After": str(RETRY_AFTER_SECONDS)})


def database_state(error: Exception) -> str:
    """Say what keeps the database from serving, for a client."""
    # A database that answers but refuses says why: its operator, not time, may have to mend it.
    if isinstance(error, Refusing):
        return f"the database refuses: {error.reason}"
    return "the database is unavailable"


def response_error(error: ResponseError):
    """Answer an error reply that stands for a refusing database with 503, any other with 500."""
    refusing = classified(error)
    if isinstance(refusing, Refusing):
        return database_unavailable(refusing)
    return internal_error(InternalServerError(original_exception=error))


def internal_error(error: InternalServerError):
    """Answer a bug with a plain 500, keeping the traceback in the log only."""
    log.error("unhandled error", exc_info=error.original_exception or error)
    return _json(500, "internal error")


def register(app) -> None:
    """Install the JSON error handlers on the app."""
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(InternalServerError, internal_error)
    # Replies that reach here unclassified (see database.classified): a call this code makes
    # through redis-py's own commands.
    app.register_error_handler(ResponseError, response_error)
    for error_class in UNAVAILABLE:
        app.register_error_handler(error_class, database_unavailable)
