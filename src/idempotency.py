"""Create a customer once per Idempotency-Key: a record naming the customer, written first.

A record `idempotency:<key>` (a hash) holds the fingerprint of the first body sent with the
key, the id drawn for its customer, that customer as the first answer shows it, and, while
the create is under way, the request that runs it and the time its lease ends. The steps:
1. BEGIN_SCRIPT writes the record (or finds it) and claims it: a record whose create is
   done is answered again; one whose lease is held by another request is busy (409); one
   whose lease ended (its request died) is taken over. With DBWAITREPLICAS, the record is
   on the replicas before the customer is written.
2. INSERT_SCRIPT writes the customer under the record's id unless the key exists already.
3. HDEL of the lease marks the create done.
The record always names the id before a customer under it can exist, so a crash or a
failover between any two steps leaves a record that a retry with the same key completes
with the same id: never a second customer, never a record without its customer once done.
Every step may run twice (see database.py): BEGIN finds its own claim (the request's drawn
id is its owner token), INSERT finds the key written, and HDEL of a field gone is a no-op.
"""

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass

import orjson
from redis import exceptions as rx

from database import on_primary, primary_of, retried, write_and_wait
from storage import customer_key, dumps, encode, flat, is_wrongtype

KEY_PREFIX = "idempotency:"
HEADER = "Idempotency-Key"
# 1 to 255 visible ASCII characters (no space), as the key is sent.
VALID_KEY = re.compile("[!-~]{1,255}")

# KEYS[1] the record; ARGV: fingerprint, drawn id, the customer's JSON, now (ms), lease end
# (ms), time to live (ms). Returns {'run', id, customer}: write the customer (a new record or
# one taken over); {'done', id, customer}; {'busy', lease end}; or {'mismatch'}.
BEGIN_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'id', 'customer', 'lease', 'owner')
if not record[1] then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'id', ARGV[2], 'customer', ARGV[3],
             'owner', ARGV[2], 'lease', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  return {'run', ARGV[2], ARGV[3]}
end
if record[1] ~= ARGV[1] then return {'mismatch'} end
if not record[4] then return {'done', record[2], record[3]} end
if record[5] == ARGV[2] or tonumber(record[4]) <= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'lease', ARGV[5])
  return {'run', record[2], record[3]}
end
return {'busy', record[4]}
"""
# KEYS[1] the customer; ARGV the name/value pairs to HSET when the key does not exist.
INSERT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for first = 1, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
return 1
"""
SCRIPTS = {hashlib.sha1(script.encode()).hexdigest(): script
           for script in (BEGIN_SCRIPT, INSERT_SCRIPT)}
BEGIN_SHA, INSERT_SHA = SCRIPTS


class KeyReused(Exception):
    """The key was first sent with another body."""


class InProgress(Exception):
    """Another request with the key is creating its customer now; args[0]: seconds it may take."""


class NotARecord(Exception):
    """The record's key holds something other than a hash (another program's data)."""


@dataclass(frozen=True)
class Created:
    """The answer to a create: the customer's id, its JSON, and whether it is a replay."""

    customer_id: str
    customer: str
    replayed: bool


def record_key(key: str) -> str:
    """Return the Redis key of the record of an Idempotency-Key."""
    return KEY_PREFIX + key


def valid_key(key: str) -> bool:
    """Tell whether an Idempotency-Key is 1 to 255 visible ASCII characters."""
    return VALID_KEY.fullmatch(key) is not None


def fingerprint(fields: dict) -> str:
    """Return a digest of a parsed body: equal content in any order or spacing, equal digest."""
    try:
        text = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


class IdempotentCreates:
    """Create customers in a CustomerStore's database, once per Idempotency-Key."""

    def __init__(self, store, ttl_seconds: float, lease_seconds: float):
        self.redis = store.redis
        # The store's: one view per process of whether the database is down.
        self.retrying = store.retrying
        self.wait_replicas = store.wait_replicas
        self.wait_timeout = store.wait_timeout
        self.ttl_ms = int(ttl_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)

    def create(self, key: str, fields: dict) -> Created:
        """Create a customer from fields unless the key's record names one; raise KeyReused,
        InProgress or NotARecord when it cannot."""
        # Drawn once, outside the retries: it is the id of a new record's customer and, in any
        # case, this request's claim on the record.
        drawn = str(uuid.uuid4())
        customer = dumps({"id": drawn, **fields}).decode()
        outcome = self._begin(key, fingerprint(fields), drawn, customer)
        if outcome[0] == "mismatch":
            raise KeyReused(key)
        if outcome[0] == "busy":
            raise InProgress(max(0.0, (int(outcome[1]) - time.time() * 1000) / 1000))
        customer_id, customer = outcome[1], outcome[2]
        if outcome[0] == "done":
            return Created(customer_id, customer, replayed=True)
        self._insert(customer_id, fields)
        self._done(key)
        return Created(customer_id, customer, replayed=False)

    @retried
    def _begin(self, key: str, fingerprint: str, drawn: str, customer: str) -> list:
        """Write or find the key's record and claim it if it is free (BEGIN_SCRIPT)."""
        now = int(time.time() * 1000)
        try:
            return self._run(record_key(key), BEGIN_SHA, fingerprint, drawn, customer, now,
                             now + self.lease_ms, self.ttl_ms)
        except rx.ResponseError as error:
            if is_wrongtype(error):
                raise NotARecord(key) from None
            raise

    @retried
    def _insert(self, customer_id: str, fields: dict) -> None:
        """Write the customer unless its key exists: it is then this create's, from before."""
        to_set, _ = encode(fields)
        self._run(customer_key(customer_id), INSERT_SHA, *flat(to_set))

    @retried
    def _done(self, key: str) -> None:
        """Mark the key's create done: its record loses its lease."""
        self._write(record_key(key), ("HDEL", record_key(key), "lease"))

    def _run(self, key: str, sha: str, *args):
        """Run one of SCRIPTS on key, loading it first on a node that lacks it."""
        for attempt in range(2):
            try:
                return self._write(key, ("EVALSHA", sha, 1, key, *args))
            except rx.NoScriptError:
                if attempt:
                    raise
                primary_of(self.redis, key).script_load(SCRIPTS[sha])

    def _write(self, key: str, command: tuple):
        """Send a command to key's primary, then WAIT for replicas if configured."""
        if self.wait_replicas:
            return write_and_wait(self.redis, key, [command], self.wait_replicas,
                                  self.wait_timeout)[0]
        return on_primary(self.redis, key, *command)
