"""Optional bearer tokens: every request but the health checks names one of API_TOKENS."""

import hashlib
import hmac
import ipaddress
import logging

from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
REALM = "customers"


def _digest(token: bytes) -> bytes:
    # Equal-length digests keep compare_digest from revealing a token's length.
    return hashlib.sha256(token).digest()


def _refuse(message: str, error: str | None = None):
    challenge = WWWAuthenticate("bearer", {"realm": REALM, **({"error": error} if error else {})})
    raise Unauthorized(description=message, www_authenticate=challenge)


def require_tokens(app, tokens, path_tokens=None) -> None:
    """Make every request outside OPEN_PATHS send Authorization: Bearer with one of the tokens.

    path_tokens maps a path to more tokens that open that path alone (METRICS_TOKEN, /metrics).
    """
    digests = [_digest(token.encode()) for token in tokens]
    by_path = {path: digests + [_digest(token.encode()) for token in more]
               for path, more in (path_tokens or {}).items() if more}
    if not digests and not by_path:
        return

    @app.before_request
    def check_token():
        if request.path in OPEN_PATHS:
            return
        accepted = by_path.get(request.path, digests)
        if not accepted:  # only a path's own tokens are set: the other paths stay open
            return
        sent = request.authorization
        if sent is None or sent.type != "bearer" or not sent.token:
            _refuse('send "Authorization: Bearer <token>"')
        given = _digest(sent.token.encode("utf-8", "surrogateescape"))
        matched = False
        for digest in accepted:  # every token, always: the time taken tells nothing
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            _refuse("the bearer token is not valid", "invalid_token")


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(config) -> None:
    """Log a warning when the service listens beyond loopback without tokens."""
    if not config.api_tokens and not is_loopback(config.host):
        log.warning("listening on %s without API_TOKENS: anyone who can reach it can read and "
                    "change every customer", config.host)
