"""List customers across every primary: pages behind opaque cursors, or one bounded walk."""

import base64
import binascii
import bisect
import hashlib
import heapq
import hmac
import json
import logging
import time
from array import array

from redis import exceptions as rx
from redis.exceptions import AskError, ClusterError
from redis.exceptions import TimeoutError as NoAnswer

import metrics
import projection
from database import UNAVAILABLE, classified, primary_of
from storage import (
    KEY_PREFIX,
    CustomerStore,
    addressable,
    decode,
    decode_all,
    is_wrongtype,
)

log = logging.getLogger(__name__)
# Keys a SCAN step asks for, and so customers a batch reads: small enough that a batch's
# replies and customers stay in the CPU's caches (250 listed faster than 1,000 or 4,000).
SCAN_COUNT = 250
MATCH = KEY_PREFIX + "*"
CURSOR_VERSION = 2
# A cursor must fit in a URL (granian answers 414 beyond 64 KB) even percent-encoded, as a
# client's wrong one may be (4,096 characters of 4 UTF-8 bytes, 12 characters each: 48 KB).
MAX_CURSOR_LENGTH = 4096
MAX_PENDING_BYTES = 2000
RESUME_PAUSE_SECONDS = 0.5


class BadCursor(ValueError):
    """A cursor that this service did not make."""


class StaleCursor(Exception):
    """A cursor made before the cluster's primaries or their slots changed."""


def topology(redis) -> tuple[str, list]:
    """Return a fingerprint of which primary holds which slots, and a client per primary."""
    if not hasattr(redis, "get_primaries"):
        return "single", [redis]
    layout = sorted(_slot_layout(redis))
    fingerprint = hashlib.blake2b(repr(layout).encode(), digest_size=6).hexdigest()
    names = sorted({f"{host}:{port}" for _, _, host, port in layout})
    if any(redis.get_node(node_name=name) is None for name in names):
        if hasattr(redis, "relearn"):
            # The keeper relearns; waiting here would queue behind redis-py's locks.
            redis.relearn()
            raise ClusterError(f"the cluster's primaries changed ({names}); relearning them")
        redis.nodes_manager.initialize()
    nodes = [redis.get_node(node_name=name) for name in names]
    if None in nodes:
        raise ClusterError(f"the cluster announces primaries it cannot reach: {names}")
    outages = getattr(redis, "outages", None)
    for name in names if outages else ():
        outages.use(name)  # a primary known down: 503 now, not a wait on it
    return fingerprint, [redis.get_redis_connection(node) for node in nodes]


def _slot_layout(redis) -> list:
    """Ask the known nodes in turn, primaries first, which primary serves which slots.

    Nodes known down are skipped, and a node that times out ends the search: a paused
    cluster costs one DBTIMEOUT, not one per node.
    """
    failure = None
    outages = getattr(redis, "outages", None)
    for node in redis.get_primaries() + redis.get_replicas():
        if outages and outages.is_down(node.name):
            continue
        try:
            try:
                reply = redis.get_redis_connection(node).execute_command("CLUSTER SLOTS")
            except rx.ResponseError as error:
                raise classified(error) from None  # a BUSY node: another may answer
        except UNAVAILABLE as error:
            if outages:
                outages.failed(error, node.name)
            if isinstance(error, NoAnswer):
                raise
            failure = error
            continue
        # A node that never learnt its own address (a one-node cluster) announces no host.
        return [(start, end, primary[0] or node.host, primary[1])
                for start, end, primary, *_ in reply]
    raise failure or ClusterError("no node of the cluster is known, or every one is down")


def fetch(redis, node, keys, batch, asked: tuple = ()) -> list:
    """Read customers (whole, or the fields asked) from one node in one round trip, skipping
    keys gone or retyped."""
    if not keys:
        return []
    replies, _ = batch(node, keys, (), asked).receive()
    return customers_of(redis, keys, replies, asked)


def customers_of(redis, keys: list, replies: list, asked: tuple = ()) -> list:
    """Turn HGETALL (or, for the fields asked, HMGET) replies into customers, skipping keys
    gone or retyped."""
    if asked:
        return projection.customers_of(redis, keys, replies, asked)
    start = len(KEY_PREFIX)
    if all(type(raw) is list for raw in replies):
        # The usual batch: every reply a hash (RESP2's flat list) or empty (a key gone).
        return decode_all([key[start:] for key in keys], replies)
    customers = []
    for key, raw in zip(keys, replies, strict=True):
        if isinstance(raw, Exception):
            if isinstance(raw, AskError):
                # MOVED or ASK: a resharding moved the key; the cluster client follows it.
                raw = redis.hgetall(key)
            elif is_wrongtype(raw):
                continue
            else:
                raise classified(raw)
        if raw:
            customers.append(decode(key[start:], raw))
    return customers


def scan_arguments(cursor: int, count: int) -> tuple:
    """Return the arguments of one SCAN step for customer hashes."""
    return cursor, "MATCH", MATCH, "COUNT", count, "TYPE", "hash"


def scan(node, cursor: int, count: int) -> tuple[int, list]:
    """Run one SCAN step for customer hashes on one node."""
    return node.execute_command("SCAN", *scan_arguments(cursor, count))


def encode_cursor(position: list, key: bytes) -> str:
    """Turn a walk's position into an opaque URL-safe token, signed with key."""
    text = json.dumps([CURSOR_VERSION, *position], separators=(",", ":")).encode()
    return f"{_b64(text)}.{_b64(_signature(text, key))}"


def decode_cursor(token: str, key: bytes) -> list:
    """Read a token made by encode_cursor with the same key, or raise BadCursor."""
    try:
        if len(token) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        text, signature = (_unb64(part) for part in token.split("."))
        if not hmac.compare_digest(signature, _signature(text, key)):
            raise ValueError("not signed by this deployment")
        version, *position = json.loads(text)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise BadCursor("cursor is not one this service made") from None
    # Signed by this service: a check against its own bugs, not a client's forgery.
    if version != CURSOR_VERSION or len(position) != 4:
        raise BadCursor("cursor is not one this service made")
    return position


def _signature(text: bytes, key: bytes) -> bytes:
    return hmac.digest(key, text, "sha256")[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))


def page(store: CustomerStore, limit: int, token: str | None, key: bytes, asked: tuple = ()):
    """Return at most limit customers from where token left off, and the token of the rest;
    with asked (projection.arguments), only those fields."""
    position = decode_cursor(token, key) if token else None
    return store.retrying(_page, store.redis, store.batch, limit, position, key, asked)


def _page(redis, batch, limit: int, position: list | None, key: bytes,
          asked: tuple = ()) -> tuple[list, str | None]:
    """Walk SCAN steps from position until limit customers are taken; see docs/listing.md.

    A SCAN step is never run twice: the keys of a step beyond the page travel in the next
    cursor (pending), so that writes between pages cannot make a page repeat a step's keys.
    """
    fingerprint, nodes = topology(redis)
    fingerprint_sent, index, cursor, pending = position or (fingerprint, 0, 0, [])
    if fingerprint_sent != fingerprint:
        raise StaleCursor("the cluster's primaries changed since this listing began")
    if position and (index > len(nodes) or index == len(nodes) and not pending):
        raise BadCursor("cursor is not one this service made")
    taken, customers = set(), []
    keys = [KEY_PREFIX + customer_id for customer_id in pending]
    # Pending keys were found on the node before a finished one: read them from their owner.
    node = primary_of(redis, keys[0]) if keys else None
    before = None  # where the last SCAN step started, set once one ran (then taken is too)
    while True:
        keys = [key for key in dict.fromkeys(keys) if key not in taken]
        want = limit - len(taken)
        keys, pending = keys[:want], keys[want:]
        if taken and len("".join(pending).encode()) > MAX_PENDING_BYTES:
            # Too many long ids to carry in a URL: the next page runs this step again.
            index, cursor, pending = before
            break
        taken.update(keys)
        customers += fetch(redis, node, keys, batch, asked)
        if pending or len(taken) == limit or index == len(nodes):
            break
        before, node = (index, cursor, []), nodes[index]
        cursor, keys = scan(node, cursor, min(SCAN_COUNT, limit - len(taken)))
        keys = addressable(keys)
        index += cursor == 0
    if pending or index < len(nodes):
        pending = [pending_key[len(KEY_PREFIX):] for pending_key in pending]
        return customers, encode_cursor([fingerprint, index, cursor, pending], key)
    return customers, None


class SeenKeys:
    """Remember keys by 64-bit hash: a sorted array (8 bytes a key) and a set of recent ones."""

    def __init__(self):
        self.merged = array("q")
        self.recent = set()

    def __contains__(self, key: str) -> bool:
        digest = hash(key)
        if digest in self.recent:
            return True
        at = bisect.bisect_left(self.merged, digest)
        return at < len(self.merged) and self.merged[at] == digest

    def unseen(self, keys, besides=()) -> list:
        """Return the keys neither recorded yet nor among besides, each once, in their order."""
        keys = dict.fromkeys(keys)
        for key in besides:
            keys.pop(key, None)
        if not self.merged:
            recent = self.recent
            return [key for key in keys if hash(key) not in recent]
        return [key for key in keys if key not in self]

    def update(self, keys) -> None:
        """Record the keys."""
        self.recent.update(map(hash, keys))
        # Merging only when the set outgrows an eighth of the array keeps the work linear.
        if len(self.recent) > max(65536, len(self.merged) // 8):
            self.merged = array("q", heapq.merge(self.merged, sorted(self.recent)))
            self.recent.clear()


def walk(store: CustomerStore, asked: tuple = ()):
    """Yield every customer once, in batches; after an outage, walk again past those sent.
    With asked (projection.arguments), only those fields of each."""
    seen = SeenKeys()
    sent = False
    deadline = None
    outages = store.retrying.outages
    try:
        while True:
            try:
                nodes = topology(store.redis)[1]
                for customers in _batches(store.redis, store.batch, nodes, seen, asked):
                    sent = True
                    yield customers
                return
            except UNAVAILABLE as error:
                metrics.database_error(error)
                # Before the first customer the caller can still answer 503; after it, resume,
                # but not after a timeout (the database is slow: waiting more would hold a
                # thread), nor when the threads that may wait are all waiting.
                if not sent or isinstance(error, NoAnswer):
                    raise
                if deadline is None:
                    if not outages.try_wait():
                        raise
                    # Within the same budget as any other request (DBRETRYSECONDS).
                    deadline = time.monotonic() + store.retry_seconds
                if time.monotonic() + RESUME_PAUSE_SECONDS > deadline:
                    raise
                log.warning("listing interrupted (%s); walking again past what was sent", error)
                metrics.operation_retried()
                time.sleep(RESUME_PAUSE_SECONDS)
    finally:
        if deadline is not None:
            outages.done_waiting()


def _batches(redis, batch_class, nodes: list, seen: SeenKeys, asked: tuple = ()):
    """Yield the customers of every node not in seen, a batch at a time, adding their keys to seen.

    A node's next batch goes out before this batch's customers are decoded, and a node's first
    SCAN step goes out with the last batch of the node before it: they read while we decode.
    Their replies are read before a batch is yielded: while the client reads, the walk holds
    no Redis connection.
    """
    at, upcoming = 0, None  # upcoming: the next node's first SCAN step, once answered
    batch = batch_class(nodes[0], [], scan_arguments(0, SCAN_COUNT)) if nodes else None
    following = None  # the next node's first SCAN step, sent
    try:
        received = (batch.keys, batch.receive()) if batch else None
        batch = None
        while received:
            keys, (replies, scanned) = received
            received = None
            if scanned is None and upcoming:
                # This node is done: the next node's first batch goes out now.
                at, scanned, upcoming = at + 1, upcoming, None
            if scanned:
                # SCAN may repeat keys of this batch, not yet in seen.
                cursor, found = int(scanned[0]), scanned[1]
                fresh = addressable(seen.unseen(found, besides=keys))
                step = scan_arguments(cursor, SCAN_COUNT) if cursor else ()
                batch = batch_class(nodes[at], fresh, step, asked)
                if not cursor and at + 1 < len(nodes):
                    following = batch_class(nodes[at + 1], [], scan_arguments(0, SCAN_COUNT))
            customers = customers_of(redis, keys, replies, asked)
            if batch:
                received, batch = (batch.keys, batch.receive()), None
            if following:
                upcoming, following = following.receive()[1], None
            # Only now do these keys count as sent: had a read above failed (a failover), the
            # walk would start again without them, and their customers were never sent.
            seen.update(keys)
            if customers:
                yield customers
    finally:
        for pending in (batch, following):
            if pending:
                pending.close()
