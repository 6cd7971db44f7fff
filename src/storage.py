"""Keep customers in Redis: one hash per customer, typed values kept as plain text."""

import hashlib
import json
import uuid

import orjson
from redis import exceptions as rx

from database import ReplicasBehind, Retrying, on_primary, primary_of, retried, write_and_wait

KEY_PREFIX = "customer:"
# A field "_type:<name>" records the JSON type of a non-string field <name>.
TYPE_PREFIX = "_type:"
# A conditional write re-reads and retries when another writer changed the key meanwhile.
WATCH_ATTEMPTS = 50


class Unreplicated(rx.RedisError):
    """A conditional write reached its primary but too few replicas: not acknowledged."""


# Errors that mean the database cannot answer now, as opposed to a bug in a request.
UNAVAILABLE = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterError,
    rx.RedisClusterException,
    rx.TryAgainError,
    rx.MasterDownError,
    rx.ReadOnlyError,
    rx.NoPermissionError,
    rx.AuthenticationError,
    rx.AuthorizationError,
    rx.BusyLoadingError,
    rx.AskError,  # MOVED or ASK still, after retries: the slots are moving
    ReplicasBehind,
    Unreplicated,
)


# HSET then HDEL on one key as one atomic step, in one round trip (a MULTI/EXEC pipeline
# measured twice as slow). ARGV: the number of fields to set, their name/value pairs, then
# the fields to delete; unpack() takes at most a few thousand values at a time.
MERGE_SCRIPT = """
local set_end = tonumber(ARGV[1]) * 2 + 1
for first = 2, set_end, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, set_end)))
end
for first = set_end + 1, #ARGV, 1000 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
return 1
"""
MERGE_SHA = hashlib.sha1(MERGE_SCRIPT.encode()).hexdigest()


class NotACustomer(Exception):
    """The key of a customer holds something other than a hash."""


class PreconditionFailed(Exception):
    """The customer is not in the version the caller's condition requires."""


class NothingLeft(Exception):
    """A patch would remove every field, leaving no customer to store."""


class Contended(rx.TryAgainError):
    """Other writers kept changing the customer while a conditional write tried to apply."""


def customer_key(customer_id: str) -> str:
    """Return the Redis key of a customer."""
    return KEY_PREFIX + customer_id


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
        if kind == "float":
            return float(text)
        if kind == "bool" and text in ("true", "false"):
            return text == "true"
    except ValueError:
        pass
    return text


def decode(customer_id: str, raw) -> dict:
    """Turn a stored hash (a dict, or RESP2's flat list of names and values) into the customer."""
    if type(raw) is not list:
        raw = flat(raw)
    return decoder(raw)(customer_id, raw)


# Customers mostly share a few shapes (the same field names in the same order): a shape seen
# twice gets a decoder of its own, written once. Bounded, as shapes may not be: in number, and
# in size (a written decoder costs memory in proportion to its names).
_DECODERS: dict = {}
MAX_SHAPES = 1024
MAX_WRITTEN_NAMES = 128


def decoder(raw: list):
    """Return a function(customer_id, raw) that decodes flat hashes with raw's names in order."""
    names = tuple(raw[::2])
    function = _DECODERS.get(names)
    if function is _by_name and len(names) <= MAX_WRITTEN_NAMES:
        function = _DECODERS[names] = _written(names)
    elif function is None:
        if len(_DECODERS) >= MAX_SHAPES:
            _DECODERS.clear()
        function = _DECODERS[names] = _by_name
    return function


def decode_all(customer_ids: list, raws: list) -> list:
    """Decode many stored hashes (RESP2 flat lists) at once, skipping empty ones (keys gone)."""
    customers = []
    for customer_id, raw in zip(customer_ids, raws, strict=True):
        if raw:
            # decoder() inlined for shapes with a decoder written: a call less per customer.
            function = _DECODERS.get(tuple(raw[::2]))
            if function is None or function is _by_name:
                function = decoder(raw)
            customers.append(function(customer_id, raw))
    return customers


def _by_name(customer_id: str, raw: list) -> dict:
    """Decode any flat hash name by name: a marker types its field and goes; "id" is the key's."""
    names = raw[::2]
    customer = {"id": customer_id}
    customer.update(zip(names, raw[1::2], strict=True))
    for name in names:
        if name.startswith(TYPE_PREFIX):
            kind = customer.pop(name)
            field = name[len(TYPE_PREFIX):]
            if field in customer:
                customer[field] = _typed(customer[field], kind)
    customer["id"] = customer_id
    return customer


def _written(names: tuple):
    """Write the decoder of one shape as a dict display, the fastest way Python builds a dict."""
    items, scope = ["'id': customer_id"], {"_typed": _typed}
    for at, name in enumerate(names):
        if name.startswith(TYPE_PREFIX) or name == "id":
            continue
        value = f"raw[{2 * at + 1}]"
        if TYPE_PREFIX + name in names:
            value = f"_typed({value}, raw[{2 * names.index(TYPE_PREFIX + name) + 1}])"
        # Only positions go into the source; the names are values in its scope, never code.
        scope[f"name{at}"] = name
        items.append(f"name{at}: {value}")
    return eval(f"lambda customer_id, raw: {{{', '.join(items)}}}", scope)


def dumps(item) -> bytes:
    """Encode as compact JSON: orjson's speed, json's range (integers beyond 64 bits)."""
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:
        return json.dumps(item, separators=(",", ":")).encode()


def canonical(customer: dict) -> bytes:
    """Return a customer as JSON, id first, other fields sorted: equal content, equal bytes."""
    return dumps({"id": customer["id"], **dict(sorted(customer.items()))})


def fingerprint(text: bytes) -> str:
    """Return the version of a customer from its canonical JSON."""
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def version(customer: dict) -> str:
    """Return a fingerprint of a customer's content: equal content, equal version."""
    return fingerprint(canonical(customer))


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
                 wait_timeout: float = 1.0):
        self.redis = redis
        self.retry_seconds = retry_seconds
        self.retrying = Retrying(redis, retry_seconds)
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout

    def _write(self, key: str, commands: list) -> None:
        """Apply write commands on one key atomically, then WAIT for replicas if configured."""
        if self.wait_replicas:
            write_and_wait(self.redis, key, commands, self.wait_replicas, self.wait_timeout)
        elif len(commands) == 1:
            on_primary(self.redis, key, *commands[0])
        else:
            # One key, one slot: a MULTI/EXEC applies all or none.
            pipe = self.redis.pipeline(transaction=True)
            for command in commands:
                pipe.execute_command(*command)
            pipe.execute()

    @retried
    def get(self, customer_id: str) -> dict | None:
        """Return one customer, or None when there is none."""
        key = customer_key(customer_id)
        try:
            raw = on_primary(self.redis, key, "HGETALL", key)
        except rx.ResponseError as error:
            if str(error).startswith("WRONGTYPE"):
                return None
            raise
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
    def merge(self, customer_id: str, fields: dict) -> None:
        """Set the given fields of a customer, removing those given as None."""
        key = customer_key(customer_id)
        try:
            if self.wait_replicas:
                self._write(key, merge_commands(key, fields))
            else:
                to_set, to_delete = encode(fields)
                command = ("EVALSHA", MERGE_SHA, 1, key, len(to_set), *flat(to_set), *to_delete)
                try:
                    on_primary(self.redis, key, *command)
                except rx.NoScriptError:
                    # A node that restarted or was added has no scripts yet.
                    primary_of(self.redis, key).script_load(MERGE_SCRIPT)
                    on_primary(self.redis, key, *command)
        except rx.ResponseError as error:
            if "WRONGTYPE" in str(error):
                raise NotACustomer(customer_id) from None
            raise

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
                    if "WRONGTYPE" not in str(error):
                        raise
                    raw = {}
                current = decode(customer_id, raw) if raw else None
                commands = plan(current)
                if not commands:
                    return current
                pipe.execute_command("MULTI")
                for command in commands:
                    pipe.execute_command(*command)
                replies = pipe.execute_command("EXEC")
                if replies is None:
                    continue  # another writer changed the customer after WATCH: read again
                for reply in replies:
                    if isinstance(reply, rx.ResponseError) and "WRONGTYPE" in str(reply):
                        raise NotACustomer(customer_id)
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

    @retried
    def merge_if(self, customer_id: str, fields: dict, condition) -> None:
        """Merge fields into a customer in one atomic step if condition(version or None) holds."""
        def plan(current):
            if not condition(version(current) if current else None):
                raise PreconditionFailed(customer_id)
            return merge_commands(customer_key(customer_id), fields)

        self._checked_write(customer_id, plan)

    @retried
    def patch(self, customer_id: str, fields: dict, condition=None) -> dict | None:
        """Apply a merge patch to an existing customer in one atomic step; None if there is none."""
        def plan(current):
            if current is None:
                return []
            if condition and not condition(version(current)):
                raise PreconditionFailed(customer_id)
            if not any(name != "id" for name in patched(current, fields)):
                raise NothingLeft(customer_id)
            return merge_commands(customer_key(customer_id), fields)

        current = self._checked_write(customer_id, plan)
        return None if current is None else patched(current, fields)

    @retried
    def delete_if(self, customer_id: str, condition) -> None:
        """Remove a customer in one atomic step if condition(current version or None) holds."""
        def plan(current):
            if not condition(version(current) if current else None):
                raise PreconditionFailed(customer_id)
            return [("DEL", customer_key(customer_id))]

        self._checked_write(customer_id, plan)

    @retried
    def delete(self, customer_id: str) -> None:
        """Remove a customer; removing one that does not exist is not an error."""
        key = customer_key(customer_id)
        self._write(key, [("DEL", key)])
