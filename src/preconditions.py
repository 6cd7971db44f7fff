"""Conditional requests (RFC 9110): ETags from storage versions, If-Match and If-None-Match."""

from flask import Response, request

import errors
from representation import tagged_body, version


def tagged(customer: dict, read: bool = True) -> Response:
    """Answer with a customer and its strong ETag; for a read, 412 when If-Match does not name
    it and 304 when If-None-Match does (a write checked its conditions before writing)."""
    body, etag = tagged_body(customer)
    headers = {"ETag": f'"{etag}"'}
    if read and (unchanged := read_condition(customer["id"], etag)):
        unchanged.headers.update(headers)
        return unchanged
    return Response(body + b"\n", mimetype="application/json", headers=headers)


def conditional() -> bool:
    """Tell whether the request sends If-Match or If-None-Match (without parsing them)."""
    environ = request.environ
    return bool(environ.get("HTTP_IF_MATCH") or environ.get("HTTP_IF_NONE_MATCH"))


def parsed_conditions():
    """Return If-Match and If-None-Match as parsed; stop with 400 when one is sent but names
    neither * nor an entity tag (werkzeug reads it as absent: a write would be unconditional)."""
    if_match, if_none_match = request.if_match, request.if_none_match
    environ = request.environ
    for header, tags, sent in (("If-Match", if_match, environ.get("HTTP_IF_MATCH")),
                               ("If-None-Match", if_none_match, environ.get("HTTP_IF_NONE_MATCH"))):
        if sent and sent.strip() and not tags:
            errors.fail(400, f'{header} must be * or entity tags as ETag gives them, in quotes '
                             f'and separated by commas ({header}: "<etag>")')
    return if_match, if_none_match


def read_condition(customer_id: str, etag: str) -> Response | None:
    """Stop with 412 when If-Match does not name etag; return 304 when If-None-Match does."""
    if not conditional():  # most reads: werkzeug's parsing of both headers costs more
        return None
    if_match, if_none_match = parsed_conditions()
    # If-Match compares strongly (RFC 9110 13.1.1).
    if if_match and not if_match.contains(etag):
        errors.fail(412, f"customer {customer_id} is not in the version If-Match names")
    # If-None-Match compares weakly (RFC 9110 13.1.2).
    if if_none_match.contains_weak(etag):
        response = Response(status=304)
        del response.headers["Content-Type"]
        return response
    return None


def write_condition():
    """Return a test of the current customer (None: none) for If-Match and If-None-Match."""
    if not conditional():
        return None
    if_match, if_none_match = parsed_conditions()
    if not if_match and not if_none_match:
        return None

    def holds(customer: dict | None) -> bool:
        current = version(customer) if customer else None
        if if_match and (current is None or not if_match.contains(current)):
            return False
        # If-None-Match compares weakly, so a W/ tag of the current version fails too.
        return not (if_none_match and current is not None and if_none_match.contains_weak(current))

    return holds
