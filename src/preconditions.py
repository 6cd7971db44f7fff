"""Conditional requests (RFC 9110): ETags from storage versions, If-Match and If-None-Match."""

import json

from flask import Response, request

from storage import version


def tagged(customer: dict) -> Response:
    """Answer with a customer and its strong ETag, or 304 when If-None-Match already has it."""
    # Equal content, equal bytes, as a strong ETag promises: the id first, then sorted fields.
    ordered = {"id": customer["id"], **dict(sorted(customer.items()))}
    response = Response(json.dumps(ordered) + "\n", mimetype="application/json")
    response.set_etag(version(customer))
    return response.make_conditional(request)


def write_condition():
    """Return a test of the current version (None: no customer) for If-Match and If-None-Match."""
    if_match, if_none_match = request.if_match, request.if_none_match
    if not if_match and not if_none_match:
        return None

    def holds(current: str | None) -> bool:
        if if_match and (current is None or not if_match.contains(current)):
            return False
        # If-None-Match compares weakly, so a W/ tag of the current version fails too.
        return not (if_none_match and current is not None and if_none_match.contains_weak(current))

    return holds
