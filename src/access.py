"""Who may use the service: bearer tokens on every path but the health checks, safe headers."""

import functools
import hashlib
import hmac
import logging
from urllib.parse import urlsplit

from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import HTTPException, Unauthorized

from settings import is_loopback

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
REALM = "customers"


class MisdirectedRequest(HTTPException):
    """421: the request names a server this one does not answer for (RFC 9110 15.5.20)."""

    code = 421
    description = "this service does not answer for the Host the request names"


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


@functools.lru_cache(maxsize=256)  # a few names come again and again: parsed once
def names_this_machine(host_header: str) -> bool:
    """Tell whether a Host header names a loopback address, localhost or a *.localhost name
    (or 0.0.0.0, which reaches this machine too)."""
    try:
        name = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # an unclosed [
        return False
    return is_loopback(name) or name.endswith(".localhost") or name in ("0.0.0.0", "::")


def check_host() -> None:
    """Stop with 421 when the Host header names another machine (paths in OPEN_PATHS excepted).

    Without tokens, a service on loopback serves whoever reaches it, and a web page can reach
    it: its script asks for its own name, which its DNS then points at 127.0.0.1 (DNS
    rebinding). The browser sends that name as the Host; a client of this machine sends one of
    its own names.
    """
    host = request.environ.get("HTTP_HOST")
    if host is None or names_this_machine(host) or request.path in OPEN_PATHS:
        return
    raise MisdirectedRequest(
        f"Host {host[:100]!r} is not a name of this machine: without API tokens, the service "
        "answers only requests sent to localhost or a loopback address (a web page can point "
        "its own name at 127.0.0.1); set API_TOKENS to serve requests under other names")


def install(app, tokens, path_tokens=None, host: str = "127.0.0.1") -> Guard:
    """Make every request outside OPEN_PATHS name one of the tokens (if any), or, open on a
    loopback host, be addressed to this machine; add the headers."""
    guard = Guard(tokens, path_tokens)
    if guard.digests or guard.by_path:
        app.before_request(guard.check_token)
    if not guard.digests and is_loopback(host):
        app.before_request(check_host)
    app.after_request(guard.add_headers)
    return guard


def warn_if_open(config) -> None:
    """Log a warning when the service listens beyond loopback without tokens (AUTH=none)."""
    if not config.api_tokens and not is_loopback(config.host):
        log.warning("AUTH=none: listening on %s without API tokens; anyone who can reach it can "
                    "read and change every customer", config.host)
