"""Keep customers in Redis: one hash per customer, typed values kept as plain text."""

import uuid

from redis import exceptions as rx

KEY_PREFIX = "customer:"
# A field "_type:<name>" records the JSON type of a non-string field <name>.
TYPE_PREFIX = "_type:"

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


class NotACustomer(Exception):
    """The key of a customer holds something other than a hash."""


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


def decode(customer_id: str, raw: dict) -> dict:
    """Turn a stored hash into the customer's JSON object."""
    customer = {"id": customer_id}
    for name, text in raw.items():
        if not name.startswith(TYPE_PREFIX) and name != "id":
            customer[name] = _typed(text, raw.get(TYPE_PREFIX + name))
    return customer


class CustomerStore:
    """Read and write customers in a Redis or Redis Cluster client."""

    def __init__(self, redis):
        self.redis = redis
        self._merge = None

    def get(self, customer_id: str) -> dict | None:
        """Return one customer, or None when there is none."""
        try:
            raw = self.redis.hgetall(customer_key(customer_id))
        except rx.ResponseError as error:
            if str(error).startswith("WRONGTYPE"):
                return None
            raise
        return decode(customer_id, raw) if raw else None

    def create(self, fields: dict) -> dict:
        """Store a new customer under a fresh id and return it."""
        customer_id = str(uuid.uuid4())
        self.merge(customer_id, fields)
        stored = {name: value for name, value in fields.items() if value is not None}
        return {"id": customer_id, **stored}

    def merge(self, customer_id: str, fields: dict) -> None:
        """Set the given fields of a customer, removing those given as None."""
        to_set, to_delete = encode(fields)
        if self._merge is None:
            self._merge = self.redis.register_script(MERGE_SCRIPT)
        pairs = [part for item in to_set.items() for part in item]
        try:
            self._merge(keys=[customer_key(customer_id)], args=[len(to_set), *pairs, *to_delete])
        except rx.ResponseError as error:
            if "WRONGTYPE" in str(error):
                raise NotACustomer(customer_id) from None
            raise

    def delete(self, customer_id: str) -> None:
        """Remove a customer; removing one that does not exist is not an error."""
        self.redis.delete(customer_key(customer_id))

    def nodes(self) -> list:
        """Return a plain client for each primary (the client itself when not a cluster)."""
        if hasattr(self.redis, "get_primaries"):
            primaries = self.redis.get_primaries()
            return [self.redis.get_redis_connection(node) for node in primaries]
        return [self.redis]
