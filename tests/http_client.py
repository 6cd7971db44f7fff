"""A tiny JSON HTTP client for tests against a running service, and a raw socket reader."""

import json
import urllib.error
import urllib.request


def call(url: str, method: str = "GET", body=None, timeout: float = 10, headers=None):
    """Send a request and return (status, headers, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    return status, headers, json.loads(raw) if raw else None


def read_until_closed(sock, until=(TimeoutError,)) -> bytes:
    """Return what a raw socket receives until the server closes it or an error of until."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except until:
        pass
    return received
