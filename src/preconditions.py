"""Conditional requests (RFC 9110): ETags from storage versions, If-Match and If-None-Match."""

from flask import Response, request

import errors
from representation import canonical, fingerprint, version


def tagged(customer: dict, read: bool = True) -> Response:
    """Answer with a customer and its strong ETag; for a read, 412 when If-Match does not name
    it and 304 when If-None-Match does (a write checked its conditions before writing)."""
    body = canonical(customer)
    etag = fingerprint(body)
    headers = {"ETag": f'"{etag}"'}
    # If-Match compares strongly (RFC 9110 13.1.1).
    if read and request.if_match and not request.if_match.contains(etag):
        errors.fail(412, f"customer {customer['id']} is not in the version If-Match names")
    # If-None-Match compares weakly (RFC 9110 13.1.2).
    if read and request.if_none_match.contains_weak(etag):
        response = Response(status=304, headers=headers)
        del response.headers["Content-Type"]
        return response
    return Response(body + b"\n", mimetype="application/json", headers=headers)


def write_condition():
    """Return a test of the current customer (None: none) for If-Match and If-None-Match."""
    if_match, if_none_match = request.if_match, request.if_none_match
    if not if_match and not if_none_match:
        return None

    def holds(customer: dict | None) -> bool:
        current = version(customer) if customer else None
        if if_match and (current is None or not if_match.contains(current)):
            return False
        # If-None-Match compares weakly, so a W/ tag of the current version fails too.
        return not (if_none_match and current is not None and if_none_match.contains_weak(current))

    return holds
