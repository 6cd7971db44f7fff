"""Keep customers in Redis: one hash per customer, typed values kept as plain text."""

import hashlib
import logging
import math
import re
import threading
import uuid
from operator import itemgetter

from redis import exceptions as rx

from bulk import batch_class
from database import (
    Retrying,
    Unreplicated,
    classified,
    on_primary,
    primary_of,
    retried,
    run_script,
)
from outages import Outages

log = logging.getLogger(__name__)
KEY_PREFIX = "customer:"
# A field "_type:<name>" records the JSON type of a non-string field <name>.
TYPE_PREFIX = "_type:"
MAX_ID_LENGTH = 1024
# What no URL can carry back to the same key: control characters, and the surrogates that
# stand for stored bytes that are not UTF-8 (the client decodes with surrogateescape).
UNADDRESSABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# A conditional write re-reads and retries when another writer changed the key meanwhile.
WATCH_ATTEMPTS = 50


# One atomic step on one key, in one round trip (a MULTI/EXEC pipeline measured twice as
# slow): refuse a key that is not a hash, and a merge that would leave more than ARGV[1]
# fields (markers not counted) unless it shrinks the customer; then HSET and HDEL. ARGV[2]
# is the number of fields to set, then come their name/value pairs, then the fields to
# delete; unpack() takes at most a few thousand values at a time. Returns 1 when the merge
# created the customer.
MERGE_SCRIPT = """
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'hash' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE the key holds a ' .. kind .. ', not a hash')
end
local most = tonumber(ARGV[1])
local set_end = tonumber(ARGV[2]) * 2 + 2
if redis.call('HLEN', key) + tonumber(ARGV[2]) > most then
  local names, before, after = {}, 0, 0
  for _, name in ipairs(redis.call('HKEYS', key)) do
    names[name] = true
    if string.sub(name, 1, 6) ~= '_type:' then before = before + 1 end
  end
  for at = 3, set_end, 2 do names[ARGV[at]] = true end
  for at = set_end + 1, #ARGV do names[ARGV[at]] = nil end
  for name in pairs(names) do
    if string.sub(name, 1, 6) ~= '_type:' then after = after + 1 end
  end
  if after > most and after > before then
    return redis.error_reply('TOOMANYFIELDS ' .. after)
  end
end
for first = 3, set_end, 1000 do
  redis.call('HSET', key, unpack(ARGV, first, math.min(first + 999, set_end)))
end
for first = set_end + 1, #ARGV, 1000 do
  redis.call('HDEL', key, unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
if kind == 'none' and set_end > 2 then return 1 end
return 0
"""
# DEL of a customer, never of another program's key of another type.
DELETE_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return 0 end
if kind ~= 'hash' then
  return redis.error_reply('WRONGTYPE the key holds a ' .. kind .. ', not a hash')
end
return redis.call('DEL', KEYS[1])
"""
SCRIPTS = {hashlib.sha1(script.encode()).hexdigest(): script
           for script in (MERGE_SCRIPT, DELETE_SCRIPT)}
MERGE_SHA, DELETE_SHA = SCRIPTS


class NotACustomer(Exception):
    """The key of a customer holds something other than a hash."""


class TooManyFields(Exception):
    """A write would leave a customer with more fields than the limit."""


class PreconditionFailed(Exception):
    """The customer is not in the version the caller's condition requires."""


class NothingLeft(Exception):
    """A patch would remove every field, leaving no customer to store."""


class Contended(rx.TryAgainError):
    """Other writers kept changing the customer while a conditional write tried to apply."""


def customer_key(customer_id: str) -> str:
    """Return the Redis key of a customer."""
    return KEY_PREFIX + customer_id


def valid_id(customer_id: str) -> bool:
    """Tell whether an id can name a customer in a URL: 1 to 1024 characters of text, no
    control characters, not . or .. (which clients resolve away)."""
    return (0 < len(customer_id) <= MAX_ID_LENGTH and customer_id not in (".", "..")
            and not UNADDRESSABLE.search(customer_id))


def addressable(keys: list) -> list:
    """Return the customer keys whose ids are valid, logging the others (kept in the database)."""
    start = len(KEY_PREFIX)
    # The usual batch passes checks that run in C, with no Python call per key.
    if (not keys or not UNADDRESSABLE.search("".join(keys))
            and start < min(map(len, keys)) and max(map(len, keys)) <= start + MAX_ID_LENGTH
            and KEY_PREFIX + "." not in keys and KEY_PREFIX + ".." not in keys):
        return keys
    kept = [key for key in keys if valid_id(key[start:])]
    for key in set(keys).difference(kept):
        log.warning("key %a has an id no URL can name: left out of the list", key)
    return kept


def is_wrongtype(error: Exception) -> bool:
    """Tell whether a Redis error reply says the key holds another type than the command's."""
    return isinstance(error, rx.ResponseError) and str(error).startswith("WRONGTYPE")


def encode(fields: dict) -> tuple[dict, list]:
    """Split JSON fields into the hash fields to set and the ones to delete."""
    to_set, to_delete = {}, []
    for name, value in fields.items():
        marker = TYPE_PREFIX + name
        if value is None:
            to_delete += [name, marker]
        elif isinstance(value, str):
            to_set[name] = value
            to_delete.append(marker)
        elif isinstance(value, bool):
            to_set[name] = "true" if value else "false"
            to_set[marker] = "bool"
        elif isinstance(value, int):
            to_set[name] = str(value)
            to_set[marker] = "int"
        elif isinstance(value, float):
            to_set[name] = repr(value)
            to_set[marker] = "float"
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in field {name!r}")
    return to_set, to_delete


def _typed(text: str, kind: str | None):
    """Turn stored text back into its JSON type; unknown or unreadable stays text."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float" and math.isfinite(number := float(text)):
            return number  # another program's "nan" or "inf" stays text: JSON has neither
        if kind == "bool" and text in ("true", "false"):
            return text == "true"
    except ValueError:
        pass
    return text


def decode(customer_id: str, raw) -> dict:
    """Turn a stored hash (a dict, or RESP2's flat list of names and values) into the customer:
    every field but "id" and the markers, each typed by its marker; "id" is the key's."""
    if type(raw) is not list:
        raw = flat(raw)
    names = tuple(raw[::2])
    plain, values, typed = _PLANS.get(names) or plan_for(names)
    customer = {"id": customer_id}
    # Equal lengths by construction; strict= would make it a slower keyword call per customer.
    customer.update(zip(plain, values(raw)))  # noqa: B905
    for field, value_at, kind_at in typed:
        customer[field] = _typed(raw[value_at], raw[kind_at])
    return customer


def decode_all(customer_ids: list, raws: list) -> list:
    """Decode many stored hashes (RESP2 flat lists) at once, skipping empty ones (keys gone)."""
    return [decode(customer_id, raw)
            for customer_id, raw in zip(customer_ids, raws, strict=True) if raw]


# Customers mostly share a few shapes (the same field names in the same order), so each
# shape's plan is worked out once. Bounded in characters, as shapes may not be: a shape of more
# names or characters than below is planned anew each time, and the cache is emptied when its
# names reach MAX_CACHED_CHARACTERS (about 4 MB with their objects).
_PLANS: dict = {}
_PLANS_LOCK = threading.Lock()
_cached_characters = 0
MAX_CACHED_NAMES = 128
MAX_SHAPE_CHARACTERS = 4096
MAX_CACHED_CHARACTERS = 256 * 1024


def plan_for(names: tuple) -> tuple:
    """Work out how to decode a flat hash with these names in this order, and cache it."""
    global _cached_characters
    found = _plan(names)
    characters = sum(map(len, names))
    if len(names) <= MAX_CACHED_NAMES and characters <= MAX_SHAPE_CHARACTERS:
        with _PLANS_LOCK:  # a worker's threads meet new shapes at once: count each once
            if names not in _PLANS:
                if _cached_characters + characters > MAX_CACHED_CHARACTERS:
                    _PLANS.clear()
                    _cached_characters = 0
                _PLANS[names] = found
                _cached_characters += characters
    return found


def _plan(names: tuple) -> tuple:
    """Return the fields' names, a getter of their values, and (field, value, marker) positions
    of the typed ones, for flat hashes with these names in this order."""
    value_at = {name: 2 * at + 1 for at, name in enumerate(names)}
    plain, positions, typed = [], [], []
    for name, at in value_at.items():
        if name.startswith(TYPE_PREFIX) or name == "id":
            continue
        plain.append(name)
        positions.append(at)
        if TYPE_PREFIX + name in value_at:
            typed.append((name, at, value_at[TYPE_PREFIX + name]))
    if len(positions) == 1:  # itemgetter of one position returns the value, not a tuple
        return tuple(plain), lambda raw, at=positions[0]: (raw[at],), tuple(typed)
    return tuple(plain), itemgetter(*positions) if positions else lambda raw: (), tuple(typed)


def flat(pairs: dict) -> list:
    """Return name, value, name, value...: the arguments HSET takes."""
    return [part for pair in pairs.items() for part in pair]


def merge_commands(key: str, fields: dict) -> list:
    """Return the HSET and HDEL commands that merge fields into a customer's hash."""
    to_set, to_delete = encode(fields)
    commands = []
    if to_set:
        commands.append(("HSET", key, *flat(to_set)))
    if to_delete:
        commands.append(("HDEL", key, *to_delete))
    return commands


def patched(customer: dict, fields: dict) -> dict:
    """Return a customer with a merge patch applied: null removes a field."""
    return {name: value for name, value in {**customer, **fields}.items() if value is not None}


class CustomerStore:
    """Read and write customers in a Redis or Redis Cluster client."""

    def __init__(self, redis, retry_seconds: float = 0.0, wait_replicas: int = 0,
                 wait_timeout: float = 1.0, max_fields: int = 1000, fast_reader=None,
                 waiting_threads: int = 1):
        self.redis = redis
        # How listing reads batches of hashes (see bulk.py): None picks by redis-py's version.
        self.batch = batch_class(fast_reader)
        self.retry_seconds = retry_seconds
        # A cluster client brings its own outages; a plain one gets these permits to wait.
        self.retrying = Retrying(redis, retry_seconds, Outages(waiting_threads))
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.max_fields = max_fields

    def _script(self, customer_id: str, sha: str, *args):
        """Run one of SCRIPTS on a customer's key, then WAIT for replicas if configured."""
        try:
            return run_script(self.redis, SCRIPTS[sha], sha, (customer_key(customer_id),), args,
                              self.wait_replicas, self.wait_timeout)
        except rx.ResponseError as error:
            raise refusal(customer_id, error) from None

    @retried
    def get(self, customer_id: str) -> dict | None:
        """Return one customer, or None when there is none."""
        key = customer_key(customer_id)
        try:
            raw = on_primary(self.redis, key, "HGETALL", key)
        except rx.ResponseError as error:
            raise refusal(customer_id, error) from None
        return decode(customer_id, raw) if raw else None

    def create(self, fields: dict) -> dict:
        """Store a new customer under a fresh id and return it."""
        # The id is drawn once, outside merge's retries: a retried create writes the same key.
        customer_id = str(uuid.uuid4())
        to_set, _ = encode(fields)
        if self.wait_replicas or not to_set:
            self.merge(customer_id, fields)
        else:
            # A fresh key has no fields to remove: one HSET, no script.
            self._create(customer_id, to_set)
        stored = {name: value for name, value in fields.items() if value is not None}
        return {"id": customer_id, **stored}

    @retried
    def _create(self, customer_id: str, to_set: dict) -> None:
        """Write the fields of a new customer."""
        key = customer_key(customer_id)
        on_primary(self.redis, key, "HSET", key, *flat(to_set))

    @retried
    def merge(self, customer_id: str, fields: dict) -> bool:
        """Set the given fields of a customer, removing those given as None; True if created.

        A retry after a lost reply answers False for a customer its first attempt created.
        """
        to_set, to_delete = encode(fields)
        created = self._script(customer_id, MERGE_SHA, self.max_fields, len(to_set),
                               *flat(to_set), *to_delete)
        return created == 1

    def _checked_write(self, customer_id: str, plan) -> dict | None:
        """Apply plan(customer as read, or None)'s commands only if nobody wrote in between.

        WATCH, HGETALL, MULTI/EXEC and, with DBWAITREPLICAS, WAIT all go over one connection
        to the key's primary (WAIT counts that connection's writes). Returns the customer read.
        """
        key = customer_key(customer_id)
        for _ in range(WATCH_ATTEMPTS):
            with primary_of(self.redis, key).pipeline(transaction=True) as pipe:
                pipe.watch(key)
                try:
                    raw = pipe.hgetall(key)
                except rx.ResponseError as error:
                    raise refusal(customer_id, error) from None
                current = decode(customer_id, raw) if raw else None
                commands = plan(current)
                if not commands:
                    return current
                pipe.execute_command("MULTI")
                try:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = pipe.execute_command("EXEC")
                except BaseException as error:
                    # A command refused as it was queued (by a full database, say) leaves the
                    # connection inside MULTI, where the next request's commands would only
                    # be queued: it goes back to the pool closed.
                    pipe.connection.disconnect()
                    if isinstance(error, rx.ResponseError):
                        raise refusal(customer_id, error) from None
                    raise
                if replies is None:
                    continue  # another writer changed the customer after WATCH: read again
                for reply in replies:
                    if isinstance(reply, rx.ResponseError):
                        raise refusal(customer_id, reply)
                    if isinstance(reply, Exception):
                        raise reply
                if self.wait_replicas:
                    acknowledged = pipe.immediate_execute_command(
                        "WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
                    if acknowledged < self.wait_replicas:
                        raise Unreplicated(f"{acknowledged} of {self.wait_replicas} replicas "
                                           f"confirmed the write to {key}")
                return current
        raise Contended(f"customer {customer_id} kept changing during {WATCH_ATTEMPTS} attempts")

    def _merged(self, customer_id: str, current: dict | None, fields: dict) -> list:
        """Return the commands merging fields into current, unless it would hold too many."""
        before = current or {"id": customer_id}
        after = len(patched(before, fields)) - 1
        if after > self.max_fields and after > len(before) - 1:
            raise TooManyFields(after)
        return merge_commands(customer_key(customer_id), fields)

    @retried
    def merge_if(self, customer_id: str, fields: dict, condition) -> bool:
        """Merge fields into a customer in one atomic step if condition(customer or None) holds;
        True if that created it."""
        def plan(current):
            if not condition(current):
                raise PreconditionFailed(customer_id)
            return self._merged(customer_id, current, fields)

        created = self._checked_write(customer_id, plan) is None
        return created and any(value is not None for value in fields.values())

    @retried
    def patch(self, customer_id: str, fields: dict, condition=None) -> dict | None:
        """Apply a merge patch to an existing customer in one atomic step; None if there is none."""
        def plan(current):
            if current is None:
                return []
            if condition and not condition(current):
                raise PreconditionFailed(customer_id)
            if not any(name != "id" for name in patched(current, fields)):
                raise NothingLeft(customer_id)
            return self._merged(customer_id, current, fields)

        current = self._checked_write(customer_id, plan)
        return None if current is None else patched(current, fields)

    @retried
    def delete_if(self, customer_id: str, condition) -> None:
        """Remove a customer in one atomic step if condition(customer or None) holds."""
        def plan(current):
            if not condition(current):
                raise PreconditionFailed(customer_id)
            return [("DEL", customer_key(customer_id))]

        self._checked_write(customer_id, plan)

    @retried
    def delete(self, customer_id: str) -> None:
        """Remove a customer; removing one that does not exist is not an error."""
        self._script(customer_id, DELETE_SHA)


def refusal(customer_id: str, error: rx.ResponseError) -> Exception:
    """Return the domain error a Redis error reply about a customer's key stands for, or the
    error itself when it stands for none."""
    if is_wrongtype(error):
        return NotACustomer(customer_id)
    if str(error).startswith("TOOMANYFIELDS"):
        return TooManyFields(int(str(error).split()[1]))
    return classified(error)
