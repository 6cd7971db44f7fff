"""Create a customer once per Idempotency-Key: the key's record and its customer in one step.

A record `idempotency:<key>` (a hash) holds the fingerprint of the first body sent with the
key, the id of the customer it created and that customer's JSON as the first 201 showed it.
The customer's id is a uuid4 whose last four hex digits are chosen so that its key
`customer:<id>` lands in the record's slot: one Lua script on one shard then checks the record
and writes both, or neither, so no crash or failover can leave one without the other, and
with DBWAITREPLICAS one WAIT covers both. The id is drawn before the first attempt, so a
retry after a lost reply finds the record naming its own id: the same create, not a repeat.
"""

import binascii
import hashlib
import itertools
import json
import re
import uuid
from dataclasses import dataclass

import orjson
from redis import exceptions as rx
from redis.crc import key_slot

from database import retried, run_script
from representation import dumps
from storage import KEY_PREFIX as CUSTOMER_PREFIX
from storage import customer_key, encode, flat, is_wrongtype

KEY_PREFIX = "idempotency:"
HEADER = "Idempotency-Key"
# 1 to 255 visible ASCII characters (no space), as the key is sent.
VALID_KEY = re.compile("[!-~]{1,255}")
SLOTS = 16384
# A slot (CRC16 of the key, modulo 16384) -> four hex digits whose CRC16 gives it. CRC16 is
# linear: CRC(prefix + digits) = CRC(prefix + four zero bytes) XOR CRC(digits). Four hex
# digits reach about 80% of the slots; a draw that needs another is drawn again.
ENDINGS = {}
for _digits in itertools.product(b"0123456789abcdef", repeat=4):
    ENDINGS.setdefault(binascii.crc_hqx(bytes(_digits), 0) % SLOTS, bytes(_digits).decode())
MAX_DRAWS = 200

# KEYS: the record, the customer (one slot). ARGV: fingerprint, customer id, customer JSON,
# time to live (ms), then the customer's name/value pairs. Returns {'created'|'done', id,
# customer JSON} or {'mismatch'}. A replay writes too, so that its WAIT covers the first.
CREATE_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'id', 'customer')
if record[1] then
  if record[1] ~= ARGV[1] then return {'mismatch'} end
  redis.call('HSET', KEYS[1], 'replayed', '1')
  return {'done', record[2], record[3]}
end
for first = 5, #ARGV, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'id', ARGV[2], 'customer', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'created', ARGV[2], ARGV[3]}
"""
CREATE_SHA = hashlib.sha1(CREATE_SCRIPT.encode()).hexdigest()


class KeyReused(Exception):
    """The key was first sent with another body."""


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


def id_in_slot(slot: int) -> str:
    """Return a new uuid4 whose customer key is in slot: random but for its last 4 digits."""
    for _ in range(MAX_DRAWS):
        drawn = str(uuid.uuid4())[:-4]
        start = binascii.crc_hqx((CUSTOMER_PREFIX + drawn).encode() + bytes(4), 0)
        ending = ENDINGS.get((start ^ slot) % SLOTS)
        if ending is not None:
            return drawn + ending
    raise RuntimeError(f"no id found for slot {slot}")  # 0.2 ** 200: never


class IdempotentCreates:
    """Create customers in a CustomerStore's database, once per Idempotency-Key."""

    def __init__(self, store, ttl_seconds: float):
        self.redis = store.redis
        # The store's: one view per process of whether the database is down.
        self.retrying = store.retrying
        self.wait_replicas = store.wait_replicas
        self.wait_timeout = store.wait_timeout
        self.ttl_ms = int(ttl_seconds * 1000)

    def create(self, key: str, fields: dict) -> Created:
        """Create a customer from fields unless the key's record names one; raise KeyReused
        (another body) or NotARecord."""
        record = record_key(key)
        # Drawn once, outside the retries: a retry after a lost reply finds its own id.
        customer_id = id_in_slot(key_slot(record.encode()))
        customer = dumps({"id": customer_id, **fields}).decode()
        to_set, _ = encode(fields)
        outcome = self._create(record, customer_key(customer_id), fingerprint(fields),
                               customer_id, customer, flat(to_set))
        if outcome[0] == "mismatch":
            raise KeyReused(key)
        return Created(outcome[1], outcome[2], replayed=outcome[1] != customer_id)

    @retried
    def _create(self, record: str, key: str, fingerprint: str, customer_id: str,
                customer: str, pairs: list) -> list:
        """Run CREATE_SCRIPT on the record and the customer's key, then WAIT if configured."""
        try:
            return run_script(self.redis, CREATE_SCRIPT, CREATE_SHA, (record, key),
                              (fingerprint, customer_id, customer, self.ttl_ms, *pairs),
                              self.wait_replicas, self.wait_timeout)
        except rx.ResponseError as error:
            if is_wrongtype(error):
                raise NotARecord(record) from None
            raise
