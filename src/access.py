"""Who may use the service: bearer tokens on every path but the health checks, safe headers."""

import hashlib
import hmac
import logging

from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from settings import is_loopback

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
REALM = "customers"


def _digest(token: bytes) -> bytes:
    # Equal-length digests keep compare_digest from revealing a token's length.
    return hashlib.sha256(token).digest()


def _refuse(message: str, error: str | None = None):
    challenge = WWWAuthenticate("bearer", {"realm": REALM, **({"error": error} if error else {})})
    raise Unauthorized(description=message, www_authenticate=challenge)


def _bearer() -> str | None:
    """Return the token the request sends in Authorization: Bearer, if any."""
    sent = request.authorization
    if sent is None or sent.type != "bearer" or not sent.token:
        return None
    return sent.token


class Guard:
    """The tokens a request must name; with none configured, the service is open by choice."""

    def __init__(self, tokens):
        self.digests = [_digest(token.encode()) for token in tokens]

    def valid(self, token: str) -> bool:
        """Whether the token is one of the configured ones, in constant time."""
        given = _digest(token.encode("utf-8", "surrogateescape"))
        matched = False
        for digest in self.digests:  # every token, always: the time taken tells nothing
            matched |= hmac.compare_digest(given, digest)
        return matched

    def check_token(self) -> None:
        """Stop with 401 unless the request names a token (paths in OPEN_PATHS excepted)."""
        if request.path in OPEN_PATHS:
            return
        token = _bearer()
        if token is None:
            _refuse('send "Authorization: Bearer <token>"')
        if not self.valid(token):
            _refuse("the bearer token is not valid", "invalid_token")

    def trusted(self) -> bool:
        """Whether the request may see internal details: it names a token, or without tokens
        configured, it comes from this machine (which is everyone, on a loopback HOST)."""
        if self.digests:
            token = _bearer()
            return token is not None and self.valid(token)
        return is_loopback(request.remote_addr or "")

    def add_headers(self, response):
        """Forbid content sniffing always, and storing an answer that needed a token."""
        response.headers["X-Content-Type-Options"] = "nosniff"
        if self.digests and request.path not in OPEN_PATHS:
            response.headers["Cache-Control"] = "no-store"
        return response


def install(app, tokens) -> Guard:
    """Make every request outside OPEN_PATHS name one of the tokens (if any); add the headers."""
    guard = Guard(tokens)
    if guard.digests:
        app.before_request(guard.check_token)
    app.after_request(guard.add_headers)
    return guard


def warn_if_open(config) -> None:
    """Log a warning when the service listens beyond loopback without tokens (AUTH=none)."""
    if not config.api_tokens and not is_loopback(config.host):
        log.warning("AUTH=none: listening on %s without API tokens; anyone who can reach it can "
                    "read and change every customer", config.host)
