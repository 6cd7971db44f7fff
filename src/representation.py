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
        text = _as_text(item)
        if text != item:
            parts = item if isinstance(item, list) else [item]
            log.warning("customers %a hold bytes that are not UTF-8: sent as U+FFFD",
                        [part.get("id") for part in parts
                         if isinstance(part, dict) and _as_text(part) != part])
        return json.dumps(text, separators=(",", ":"), ensure_ascii=False).encode()


def _as_text(item):
    """Return item with each stored byte that is not UTF-8 (a surrogate) turned into U+FFFD."""
    if isinstance(item, dict):
        return {_as_text(name): _as_text(value) for name, value in item.items()}
    if isinstance(item, list):
        return [_as_text(value) for value in item]
    if isinstance(item, str) and UNADDRESSABLE.search(item):
        try:
            return item.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return item.encode("utf-8", "replace").decode("utf-8")
    return item


def canonical(customer: dict) -> bytes:
    """Return a customer as JSON, id first, other fields sorted: equal content, equal bytes."""
    return dumps({"id": customer["id"], **dict(sorted(customer.items()))})


def fingerprint(text: bytes) -> str:
    """Return the version of a customer from its canonical JSON."""
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def version(customer: dict) -> str:
    """Return a fingerprint of a customer's content: equal content, equal version."""
    return fingerprint(canonical(customer))
