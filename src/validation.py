"""Check what clients send before anything is stored."""

import json
import math
import re

import orjson
from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from errors import fail
from storage import TYPE_PREFIX

ID_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,128}")
MAX_FIELD_NAME = 256
MERGE_PATCH = "application/merge-patch+json"


def check_id(customer_id: str) -> None:
    """Stop with 400 unless the id is 1 to 128 letters, digits or -_.~ characters."""
    if not ID_PATTERN.fullmatch(customer_id):
        fail(400, "a customer id is 1 to 128 letters, digits or the characters - _ . ~")


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a JSON number")
    return number


def read_body() -> bytes:
    """Return the request body, or stop with 413 when it is over the limit, chunked or not."""
    body = request.get_data(cache=False)
    limit = request.max_content_length
    # Without Content-Length (a chunked body), werkzeug stops reading at the limit without a
    # word: one byte more behind it means the body was over the limit.
    if (request.content_length is None and limit is not None and len(body) >= limit
            and request.environ["wsgi.input"].read(1)):
        fail(413, RequestEntityTooLarge.description)
    return body


def read_json_object() -> dict:
    """Return the request's JSON object, or stop with 400, 413 or 415."""
    if not request.is_json:
        fail(415, "send a JSON object with Content-Type: application/json")
    try:
        body = json.loads(read_body(), parse_constant=_no_constants, parse_float=_finite)
    except (ValueError, RecursionError):
        fail(400, "the body is not valid JSON")
    if not isinstance(body, dict):
        fail(400, "the body must be a JSON object")
    try:
        orjson.dumps(body)  # fails on lone surrogates, and on integers beyond 64 bits
    except orjson.JSONEncodeError:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            fail(400, "the body holds a lone surrogate escape (\\ud800 to \\udfff), "
                      "which is no text")
    return body


def _check_id_field(body: dict, customer_id: str | None) -> None:
    if "id" not in body:
        return
    sent = body.pop("id")
    if customer_id is None:
        fail(400, "do not send an id: the service assigns one (PUT /customers/<id> chooses it)")
    if isinstance(sent, bool) or not isinstance(sent, str | int) or str(sent) != customer_id:
        fail(400, f"the id in the body ({json.dumps(sent)}) differs from the id in the path")


def read_fields(customer_id: str | None = None) -> dict:
    """Return the customer fields of the request body, or stop with a 4xx that names the problem."""
    body = read_json_object()
    _check_id_field(body, customer_id)
    if not body:
        fail(400, "the body must hold at least one field besides id")
    if customer_id is None and None in body.values():
        fail(400, "a new customer has no field to remove: send no null values")
    return _checked_fields(body)


def read_merge_patch(customer_id: str) -> dict:
    """Return the fields of a JSON merge patch (RFC 7396) on a flat customer, or stop with a 4xx."""
    if request.mimetype != MERGE_PATCH:
        fail(415, f"send a JSON merge patch with Content-Type: {MERGE_PATCH}")
    body = read_json_object()
    _check_id_field(body, customer_id)
    return _checked_fields(body)


def _checked_fields(body: dict) -> dict:
    for name, value in body.items():
        if not name:
            fail(400, "a field name must not be empty")
        if len(name) > MAX_FIELD_NAME:
            fail(400, f"a field name must be at most {MAX_FIELD_NAME} characters")
        if name.startswith(TYPE_PREFIX):
            fail(400, f"field {name!r}: names starting with {TYPE_PREFIX!r} are reserved")
        if isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "an array"
            fail(400, f"field {name!r} must be a string, number, boolean or null, not {kind}")
    return body
