"""One log line per request: method, path, status, duration and request id; never bodies."""

import logging
import random
import re
import time

from flask import g, request
from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("customers.requests")
HEADER = "X-Request-ID"
# Where WSGI keeps it: read there, not through request.headers, which costs several times more.
ENVIRON_KEY = "HTTP_" + HEADER.upper().replace("-", "_")
# A client's id is kept when it is short and plain, so that it cannot forge log lines.
CLIENT_ID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_NAMES = {"levelname": "level", "name": "logger"}


def handler(log_format: str, stream=None) -> logging.Handler:
    """Return a handler writing text lines or JSON objects to the stream (standard error)."""
    stream_handler = logging.StreamHandler(stream)
    if log_format == "json":
        stream_handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES))
    else:
        stream_handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return stream_handler


def configure(level: str, log_format: str) -> None:
    """Send every log record to standard error, as text lines or JSON objects."""
    logging.basicConfig(level=level, handlers=[handler(log_format)], force=True)


def granian_settings(level: str, log_format: str) -> dict:
    """Return granian's logging configuration: its own lines go out as ours do, text or JSON."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {},
        "handlers": {"stderr": {"()": handler, "log_format": log_format}},
        "root": {"level": level, "handlers": ["stderr"]},
        # granian's lines (its Rust side's too) are on "_granian"; its access log stays off.
        "loggers": {"_granian": {"level": level}},
    }


def _printable(text: str) -> str:
    """Escape what could break a log line or fake another (newlines, control characters)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def request_id(sent: str) -> str:
    """Return the client's request id if it is short and plain, else 32 new random hex digits."""
    # Not os.urandom: its system call lets go of the GIL, a thread switch a request under load.
    # An id needs to be unique, not secret; random reseeds in each forked worker.
    return sent if CLIENT_ID.fullmatch(sent) else random.getrandbits(128).to_bytes(16).hex()


def _start():
    g.started = time.perf_counter()
    g.request_id = request_id(request.environ.get(ENVIRON_KEY, ""))


def _finish(response):
    given = g.get("request_id") or request_id("")
    response.headers[HEADER] = given
    if not log.isEnabledFor(logging.INFO):
        return response
    milliseconds = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    method, path = _printable(request.method), _printable(request.path)
    fields = {"method": method, "path": path, "status": response.status_code,
              "duration_ms": round(milliseconds, 1), "request_id": given}
    log.info("%s %s %s %.1fms id=%s", method, path, response.status_code, milliseconds,
             given, extra=fields)
    return response


def install(app) -> None:
    """Give every request an id (the client's X-Request-ID if valid), echo it, log the request."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_finish)
