"""Create a customer once per Idempotency-Key: the key's record and its customer in one step.

A record `idempotency:<key>` (a hash) holds the fingerprint of the first body sent with the
key, the id of the customer it created and that customer's JSON as the first 201 showed it.
The customer's id is a uuid4 whose last four hex digits are chosen so that its key
`customer:<id>` lands in the record's slot: one Lua script on one shard then checks the record
and writes both, or neither, so no crash or failover can leave one without the other, and
with DBWAITREPLICAS one WAIT covers both. The id is drawn before the first attempt, so a
retry after a lost reply finds the record naming its own id: the same create, not a repeat.

With DBWAITREPLICAS a create is still in progress after its script, until the replicas confirm
it: the record then carries a lease (`pending`, a deadline in ms) that the create removes once
answered. A repeat that finds an unexpired lease answers 409; a lease left by a request that died
expires, and repeats then replay (each repeat waits for the replicas itself).
"""

import binascii
import hashlib
import itertools
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

import orjson
from redis import exceptions as rx
from redis.crc import key_slot

from database import UNAVAILABLE, ReplicasBehind, retried, run_script
from representation import dumps
from storage import KEY_PREFIX as CUSTOMER_PREFIX
from storage import customer_key, encode, flat, is_wrongtype

log = logging.getLogger(__name__)

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
# time to live (ms), the caller's clock (ms), the lease's deadline (ms; 0: none), then the
# customer's name/value pairs. Returns {'created'|'done', id, customer JSON}, {'mismatch'},
# {'busy'} (another request's create holds an unexpired lease) or {'foreign'} (a hash that is
# not a record: another program's). A replay writes too, so that its WAIT covers the first.
# The clocks compared are the services' own: a skew between hosts only moves when a repeat
# stops answering 409 and replays, never what it replays.
CREATE_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'id', 'customer', 'pending')
if record[1] then
  if record[1] ~= ARGV[1] then return {'mismatch'} end
  local lease = tonumber(record[4])
  if record[2] ~= ARGV[2] and lease and lease > tonumber(ARGV[5]) then return {'busy'} end
  if not (record[2] and record[3]) then return {'foreign'} end
  redis.call('HSET', KEYS[1], 'replayed', '1')
  return {'done', record[2], record[3]}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'foreign'} end
for first = 7, #ARGV, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'id', ARGV[2], 'customer', ARGV[3])
if ARGV[6] ~= '0' then redis.call('HSET', KEYS[1], 'pending', ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'created', ARGV[2], ARGV[3]}
"""
CREATE_SHA = hashlib.sha1(CREATE_SCRIPT.encode()).hexdigest()
# KEYS: the record. ARGV: the customer id of the create that ends. Removes its lease.
RELEASE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
return redis.call('HDEL', KEYS[1], 'pending')
"""
RELEASE_SHA = hashlib.sha1(RELEASE_SCRIPT.encode()).hexdigest()


class KeyReused(Exception):
    """The key was first sent with another body."""


class InProgress(Exception):
    """A create with the key is still waiting for the replicas to confirm it."""


class NotARecord(Exception):
    """The record's key holds another program's data: not a hash, or a hash but no record."""


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


def _wrote(results: list) -> bool:
    """Tell whether CREATE_SCRIPT wrote (a create or a replay), so that WAIT must confirm it."""
    return results[0][0] in ("created", "done")


class IdempotentCreates:
    """Create customers in a CustomerStore's database, once per Idempotency-Key."""

    def __init__(self, store, ttl_seconds: float):
        self.redis = store.redis
        # The store's: one view per process of whether the database is down.
        self.retrying = store.retrying
        self.wait_replicas = store.wait_replicas
        self.wait_timeout = store.wait_timeout
        self.ttl_ms = int(ttl_seconds * 1000)
        # As long as a create may take: its retries, then one last WAIT, and a second to answer.
        self.lease_ms = int((store.retry_seconds + store.wait_timeout + 1) * 1000)

    def create(self, key: str, fields: dict) -> Created:
        """Create a customer from fields unless the key's record names one; raise KeyReused
        (another body), InProgress or NotARecord."""
        record = record_key(key)
        # Drawn once, outside the retries: a retry after a lost reply finds its own id.
        customer_id = id_in_slot(key_slot(record.encode()))
        customer = dumps({"id": customer_id, **fields}).decode()
        to_set, _ = encode(fields)
        now = int(time.time() * 1000)
        lease = now + self.lease_ms if self.wait_replicas else 0
        try:
            outcome = self._create(record, customer_key(customer_id), fingerprint(fields),
                                   customer_id, customer, now, lease, flat(to_set))
        except ReplicasBehind:
            # Written, not confirmed: the answer is a 503, and the create no longer in progress.
            # After any other failure the database may not answer: the lease expires by itself.
            if lease:
                self._release(record, customer_id)
            raise
        if lease and outcome[1:2] == [customer_id]:
            self._release(record, customer_id)
        if outcome[0] == "mismatch":
            raise KeyReused(key)
        if outcome[0] == "busy":
            raise InProgress(key)
        if outcome[0] == "foreign":
            raise NotARecord(record)
        if outcome[1] == customer_id:
            return Created(customer_id, customer, replayed=False)
        # A replay answers what the record holds: bytes not UTF-8 in it (another program's)
        # go out as U+FFFD, as everywhere else.
        replayed = outcome[2].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return Created(outcome[1], replayed, replayed=True)

    @retried
    def _create(self, record: str, key: str, fingerprint: str, customer_id: str,
                customer: str, now: int, lease: int, pairs: list) -> list:
        """Run CREATE_SCRIPT on the record and the customer's key, then WAIT if configured."""
        try:
            return run_script(self.redis, CREATE_SCRIPT, CREATE_SHA, (record, key),
                              (fingerprint, customer_id, customer, self.ttl_ms, now, lease,
                               *pairs),
                              self.wait_replicas, self.wait_timeout, wrote=_wrote)
        except rx.ResponseError as error:
            if is_wrongtype(error):
                raise NotARecord(record) from None
            raise

    def _release(self, record: str, customer_id: str) -> None:
        """Remove the lease of a create that is answered; an unreachable database lets it expire."""
        try:
            run_script(self.redis, RELEASE_SCRIPT, RELEASE_SHA, (record,), (customer_id,))
        except UNAVAILABLE + (rx.ResponseError,) as error:
            log.warning("could not end the lease of %s (%s); it expires by itself", record, error)
