"""Check what clients send before anything is stored."""

import json
import math
import sys
from urllib.parse import unquote_to_bytes

import orjson
from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from errors import fail
from storage import MAX_ID_LENGTH, TYPE_PREFIX, valid_id

MAX_FIELD_NAME = 256
MERGE_PATCH = "application/merge-patch+json"
# The most digits of an integer within a float's range (about 1.8e308).
MAX_INTEGER_DIGITS = 309


class Invalid(ValueError):
    """Input that cannot be stored as sent; the message says why."""


class OutOfRange(ValueError):
    """A JSON number beyond what a 64-bit float holds."""


class DuplicateName(ValueError):
    """A JSON object naming one member twice."""


ID_RULE = (f"a customer id is 1 to {MAX_ID_LENGTH} characters, with no control characters, "
           "and not . or ..")
NOT_UTF8 = ("is not UTF-8 once percent-decoded: URLs carry text as the percent-encoded bytes of "
            "its UTF-8 (RFC 3986 2.5)")


def _utf8(wsgi_text: str, percent_encoded: bool = False) -> bool:
    """Tell whether a WSGI string (the request's bytes as Latin-1) is UTF-8, once decoded."""
    raw = wsgi_text.encode("latin-1")
    try:
        (unquote_to_bytes(raw) if percent_encoded else raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_query(*known: str) -> None:
    """Stop with 400 when the query names a parameter this request does not take: a list asked
    with ?limt=10 would otherwise stream every customer, a PUT with ?dry_run=1 would write."""
    query = request.environ.get("QUERY_STRING")
    if not query:
        return
    # werkzeug reads bytes that are not UTF-8 as U+FFFD: ?fields=%FF would ask for "\ufffd".
    if ("%" in query or not query.isascii()) and not _utf8(query, percent_encoded=True):
        fail(400, f"the query string {NOT_UTF8}")
    unknown = sorted(set(request.args) - set(known))
    if unknown:
        takes = f"takes only {', '.join(known)}" if known else "takes no query parameter"
        fail(400, f"unknown query parameter {unknown[0][:100]!r}: {request.method} "
                  f"{request.path[:100]} {takes}")


def check_id(customer_id: str) -> None:
    """Stop with 400 unless the id is one a URL can name (see storage.valid_id)."""
    if not valid_id(customer_id):
        fail(400, ID_RULE)
    # werkzeug reads bytes that are not UTF-8 as U+FFFD, so /customers/%FF and /customers/%FE
    # would both name customer "\ufffd": a DELETE of one would delete the other.
    if "\ufffd" in customer_id and not _utf8(request.environ["PATH_INFO"]):
        fail(400, f"the customer id {NOT_UTF8}")


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    number = float(text)
    if not math.isfinite(number):
        raise OutOfRange(text)
    return number


def _integer(text):
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS or abs(number := int(text)) > sys.float_info.max:
        raise OutOfRange(text)
    return number


def _unique(pairs):
    body = dict(pairs)
    if len(body) < len(pairs):
        seen = set()
        for name, _ in pairs:
            if name in seen:
                raise DuplicateName(name)
            seen.add(name)
    return body


def check_not_encoded(headers: dict | None = None) -> None:
    """Stop with 415 (and headers) when the body comes compressed (Content-Encoding), or 501
    when it comes in a transfer coding but chunked: neither is read here."""
    # Read as it is, a gzip body would be taken for bad JSON, and a plain one sent with the
    # header stored as if the header meant nothing (RFC 9110 8.4: 415, RFC 7694: Accept-Encoding).
    environ = request.environ
    coding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if coding not in ("", "identity"):
        fail(415, "the body must not be compressed: send it without Content-Encoding",
             {"Accept-Encoding": "identity", **(headers or {})})
    # The server undoes chunked and passes any other coding (gzip, chunked) on as it came.
    transfer = environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if any(part.strip() not in ("", "chunked") for part in transfer.split(",")):
        fail(501, "send the body with no Transfer-Encoding but chunked: the service undoes no "
                  "other coding (RFC 9112 6.1)")


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


def parse_object(text: bytes, what: str = "the body") -> dict:
    """Return the JSON object text holds, or raise Invalid naming what is wrong with it."""
    # Compact JSON as orjson writes it (this service's exports, say) parses ten times faster.
    # Only text that orjson writes back byte for byte goes that way: it holds no member named
    # twice, no number beyond range and no lone surrogate, so it reads as json.loads reads it.
    try:
        quick = orjson.loads(text)
        if type(quick) is dict and orjson.dumps(quick) == text.strip():
            return quick
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    try:
        body = json.loads(text, parse_constant=_no_constants, parse_float=_finite,
                          parse_int=_integer, object_pairs_hook=_unique)
    except OutOfRange as error:
        number = str(error)
        shown = number if len(number) <= 40 else f"{number[:20]}... ({len(number)} characters)"
        raise Invalid(f"the number {shown} is outside the range of a 64-bit float "
                      "(about 1.8e308)") from None
    except DuplicateName as error:
        raise Invalid(f"{what} names member {json.dumps(str(error))} more than once") from None
    except UnicodeDecodeError:
        # Latin-1 or Windows-1252 text, say, whatever charset the Content-Type names.
        raise Invalid(f"{what} is not UTF-8 text: JSON is sent in UTF-8 (RFC 8259 8.1)") from None
    except (ValueError, RecursionError):
        raise Invalid(f"{what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise Invalid(f"{what} must be a JSON object")
    try:
        orjson.dumps(body)  # fails on lone surrogates, and on integers beyond 64 bits
    except orjson.JSONEncodeError:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Invalid(f"{what} holds a lone surrogate escape (\\ud800 to \\udfff), "
                          "which is no text") from None
    return body


def read_json_object(refusal_headers: dict | None = None) -> dict:
    """Return the request's JSON object, or stop with 400, 413 or 415 (with refusal_headers
    when the body is compressed)."""
    if not request.is_json:
        fail(415, "send a JSON object with Content-Type: application/json")
    check_not_encoded(refusal_headers)
    try:
        return parse_object(read_body())
    except Invalid as error:
        fail(400, str(error))


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
        fail(415, f"send a JSON merge patch with Content-Type: {MERGE_PATCH}",
             {"Accept-Patch": MERGE_PATCH})
    body = read_json_object({"Accept-Patch": MERGE_PATCH})
    _check_id_field(body, customer_id)
    return _checked_fields(body)


def _checked_fields(body: dict) -> dict:
    try:
        return check_fields(body, current_app.config["MAX_FIELDS"])
    except Invalid as error:
        fail(400, str(error))


def _plain(item) -> bool:
    name, value = item
    return (0 < len(name) <= MAX_FIELD_NAME and not name.startswith(TYPE_PREFIX)
            and not isinstance(value, dict | list))


def check_fields(body: dict, most: int) -> dict:
    """Return the fields of body, or raise Invalid unless a customer can hold them as sent."""
    setting = len(body) - list(body.values()).count(None)
    # Removing every field while setting as many is the most a body can mean.
    if setting > most or len(body) > 2 * most:
        raise Invalid(f"a customer holds at most MAX_FIELDS={most} fields; the body sets "
                      f"{setting} and names {len(body)}")
    # One test a field, in C but for the call (imports check millions); a failure is named below.
    if all(map(_plain, body.items())):
        return body
    for name, value in body.items():
        if not name:
            raise Invalid("a field name must not be empty")
        if len(name) > MAX_FIELD_NAME:
            raise Invalid(f"a field name must be at most {MAX_FIELD_NAME} characters")
        if name.startswith(TYPE_PREFIX):
            raise Invalid(f"field {name!r}: names starting with {TYPE_PREFIX!r} are reserved")
        if isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "an array"
            raise Invalid(f"field {name!r} must be a string, number, boolean or null, not {kind}")
    return body
