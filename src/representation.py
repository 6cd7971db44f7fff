"""How a customer is represented in HTTP: compact JSON bodies, and ETags from their bytes."""

import hashlib
import json
import logging

import orjson

from storage import UNADDRESSABLE

log = logging.getLogger(__name__)


def dumps(item) -> bytes:
    """Encode as compact JSON: orjson's speed, json's range (integers beyond 64 bits), and
    stored bytes that are not UTF-8 as U+FFFD."""
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:
        parts = item if isinstance(item, list) else [item]
        texts = [_as_text(part) for part in parts]
        changed = [part.get("id") for part, text in zip(parts, texts, strict=True)
                   if isinstance(part, dict) and text != part]
        if changed:
            log.warning("customers %a hold bytes that are not UTF-8: sent as U+FFFD", changed)
        text = texts if isinstance(item, list) else texts[0]
        return json.dumps(text, separators=(",", ":"), ensure_ascii=False).encode()


def _as_text(item):
    """Return item with each stored byte that is not UTF-8 (a surrogate) turned into U+FFFD."""
    if isinstance(item, dict):
        text = {_as_text(name): _as_text(value) for name, value in item.items()}
        if len(text) < len(item):
            log.warning("customer %a has field names that differ only in bytes that are not "
                        "UTF-8: sent as one name, with one of their values", item.get("id"))
        return text
    if isinstance(item, list):
        return [_as_text(value) for value in item]
    if isinstance(item, str) and UNADDRESSABLE.search(item):
        try:
            return item.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return item.encode("utf-8", "replace").decode("utf-8")
    return item


def fingerprint(text: bytes) -> str:
    """Return the version of a customer from its exact JSON."""
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def tagged_body(customer: dict) -> tuple[bytes, str]:
    """Return a customer as JSON (id first, other fields sorted) and its version: equal
    content, equal bytes and version; different content, a different version."""
    ordered = {"id": customer["id"], **dict(sorted(customer.items()))}
    try:
        body = orjson.dumps(ordered)
        return body, fingerprint(body)
    except orjson.JSONEncodeError:
        # The body shows each byte that is not UTF-8 as U+FFFD, so two contents can share a
        # body: the version comes from the content itself, such bytes escaped (\udcff), so that
        # If-Match still fails after another program changed one of them.
        exact = json.dumps(ordered, separators=(",", ":")).encode()
        return dumps(ordered), fingerprint(exact)


def version(customer: dict) -> str:
    """Return the version of a customer's content (see tagged_body)."""
    return tagged_body(customer)[1]
