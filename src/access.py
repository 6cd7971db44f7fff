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

    def __init__(self, tokens, path_tokens=None):
        self.digests = [_digest(token.encode()) for token in tokens]
        # path_tokens maps a path to more tokens that open that path alone (METRICS_TOKEN).
        self.by_path = {path: self.digests + [_digest(token.encode()) for token in more]
                        for path, more in (path_tokens or {}).items() if more}

    def valid(self, token: str, digests=None) -> bool:
        """Whether the token is one of the configured ones (or of digests), in constant time."""
        given = _digest(token.encode("utf-8", "surrogateescape"))
        matched = False
        # Every token, always: the time taken tells nothing.
        for digest in self.digests if digests is None else digests:
            matched |= hmac.compare_digest(given, digest)
        return matched

    def check_token(self) -> None:
        """Stop with 401 unless the request names a token (paths in OPEN_PATHS excepted)."""
        if request.path in OPEN_PATHS:
            return
        accepted = self.by_path.get(request.path, self.digests)
        if not accepted:  # only a path's own tokens are set: the other paths stay open
            return
        token = _bearer()
        if token is None:
            _refuse('send "Authorization: Bearer <token>"')
        if not self.valid(token, accepted):
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


def install(app, tokens, path_tokens=None) -> Guard:
    """Make every request outside OPEN_PATHS name one of the tokens (if any); add the headers."""
    guard = Guard(tokens, path_tokens)
    if guard.digests or guard.by_path:
        app.before_request(guard.check_token)
    app.after_request(guard.add_headers)
    return guard


def warn_if_open(config) -> None:
    """Log a warning when the service listens beyond loopback without tokens (AUTH=none)."""
    if not config.api_tokens and not is_loopback(config.host):
        log.warning("AUTH=none: listening on %s without API tokens; anyone who can reach it can "
                    "read and change every customer", config.host)
