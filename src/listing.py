"""List customers across every primary: pages behind opaque cursors, or one bounded walk."""

import base64
import binascii
import bisect
import hashlib
import heapq
import json
import logging
import time
from array import array

from redis.exceptions import AskError, ClusterError

import metrics
from bulk import Batch
from storage import KEY_PREFIX, UNAVAILABLE, CustomerStore, decode, decode_all

log = logging.getLogger(__name__)
# Keys a SCAN step asks for, and so customers a batch reads: small enough that a batch's
# replies and customers stay in the CPU's caches (250 listed faster than 1,000 or 4,000).
SCAN_COUNT = 250
MATCH = KEY_PREFIX + "*"
CURSOR_VERSION = 1
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
        redis.nodes_manager.initialize()
    nodes = [redis.get_node(node_name=name) for name in names]
    if None in nodes:
        raise ClusterError(f"the cluster announces primaries it cannot reach: {names}")
    return fingerprint, [redis.get_redis_connection(node) for node in nodes]


def _slot_layout(redis) -> list:
    """Ask the known nodes in turn, primaries first, which primary serves which slots."""
    failure = None
    for node in redis.get_primaries() + redis.get_replicas():
        try:
            reply = redis.get_redis_connection(node).execute_command("CLUSTER SLOTS")
        except UNAVAILABLE as error:
            failure = error
            continue
        # A node that never learnt its own address (a one-node cluster) announces no host.
        return [(start, end, primary[0] or node.host, primary[1])
                for start, end, primary, *_ in reply]
    raise failure or ClusterError("no node of the cluster is known")


def fetch(redis, node, keys) -> list:
    """Read whole customers from one node in one round trip, skipping keys gone or retyped."""
    if not keys:
        return []
    replies, _ = Batch(node, keys).receive()
    return customers_of(redis, keys, replies)


def customers_of(redis, keys: list, replies: list) -> list:
    """Turn HGETALL replies into customers, skipping keys gone or retyped."""
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
            elif "WRONGTYPE" in str(raw):
                continue
            else:
                raise raw
        if raw:
            customers.append(decode(key[start:], raw))
    return customers


def scan_arguments(cursor: int, count: int) -> tuple:
    """Return the arguments of one SCAN step for customer hashes."""
    return cursor, "MATCH", MATCH, "COUNT", count, "TYPE", "hash"


def scan(node, cursor: int, count: int) -> tuple[int, list]:
    """Run one SCAN step for customer hashes on one node."""
    return node.execute_command("SCAN", *scan_arguments(cursor, count))


def encode_cursor(position: list) -> str:
    """Turn a walk's position into an opaque URL-safe token."""
    text = json.dumps([CURSOR_VERSION, *position], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> list:
    """Read a token made by encode_cursor, or raise BadCursor."""
    try:
        padded = token + "=" * (-len(token) % 4)
        version, *position = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise BadCursor("cursor is not one this service made") from None
    if version != CURSOR_VERSION or len(position) != 5:
        raise BadCursor("cursor is not one this service made")
    fingerprint, node, cursor, after, sent_digest = position
    valid = (isinstance(fingerprint, str) and _whole(node) and _whole(cursor)
             and (after is None) == (sent_digest is None)
             and (after is None or isinstance(after, str) and isinstance(sent_digest, str)))
    if not valid:
        raise BadCursor("cursor is not one this service made")
    return position


def _digest(keys: list) -> str:
    return hashlib.blake2b("\n".join(keys).encode(), digest_size=6).hexdigest()


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def page(store: CustomerStore, limit: int, token: str | None) -> tuple[list, str | None]:
    """Return at most limit customers from where token left off, and the token of the rest."""
    fingerprint, nodes = topology(store.redis)
    position = decode_cursor(token) if token else [fingerprint, 0, 0, None, None]
    if position[0] != fingerprint:
        raise StaleCursor("the cluster's primaries changed since this listing began")
    _, index, cursor, after, sent_digest = position
    if index >= len(nodes):
        raise BadCursor("cursor is not one this service made")
    taken, customers = set(), []
    while len(taken) < limit and index < len(nodes):
        want = limit - len(taken)
        node = nodes[index]
        following, keys = scan(node, cursor, SCAN_COUNT)
        batch = sorted(set(keys))
        start = 0
        # Resuming a batch the last page split: skip what it sent, if that part is unchanged.
        if after is not None:
            sent = bisect.bisect_right(batch, after)
            if _digest(batch[:sent]) == sent_digest:
                start = sent
        # Else writes changed that batch since: send it whole again (SCAN may repeat, not miss).
        keys = [key for key in batch[start:] if key not in taken]
        after = sent_digest = None
        if len(keys) > want:
            keys = keys[:want]
            after = keys[-1]
            sent_digest = _digest(batch[:bisect.bisect_right(batch, after)])
        else:
            cursor = following
            index += cursor == 0
        taken.update(keys)
        customers += fetch(store.redis, node, keys)
    if index == len(nodes):
        return customers, None
    return customers, encode_cursor([fingerprint, index, cursor, after, sent_digest])


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


def walk(store: CustomerStore):
    """Yield every customer once, in batches; after an outage, walk again past those sent."""
    seen = SeenKeys()
    sent = False
    deadline = None
    while True:
        try:
            for customers in _batches(store.redis, topology(store.redis)[1], seen):
                sent = True
                yield customers
            return
        except UNAVAILABLE as error:
            metrics.database_error(error)
            # Before the first customer the caller can still answer 503; after it, resume.
            if not sent:
                raise
            # Within the same budget as any other request (DBRETRYSECONDS), so that a slow
            # database cannot hold the service's threads with walks that wait.
            deadline = deadline or time.monotonic() + store.retry_seconds
            if time.monotonic() > deadline:
                raise
            log.warning("listing interrupted (%s); walking again past what was sent", error)
            metrics.operation_retried()
            time.sleep(RESUME_PAUSE_SECONDS)


def _batches(redis, nodes: list, seen: SeenKeys):
    """Yield the customers of every node not in seen, a batch at a time, adding their keys to seen.

    A node's next batch goes out before this batch's customers are decoded, and a node's first
    SCAN step goes out with the last batch of the node before it: they read while we decode.
    """
    at, upcoming = 0, None
    batch = Batch(nodes[0], [], scan_arguments(0, SCAN_COUNT)) if nodes else None
    try:
        while batch:
            keys, (replies, scanned) = batch.keys, batch.receive()
            batch = None
            if scanned is None and upcoming:
                # This node is done: the next node's first batch goes out now.
                at, scanned = at + 1, upcoming.receive()[1]
                upcoming = None
            if scanned:
                # SCAN may repeat keys of this batch, not yet in seen.
                cursor, found = int(scanned[0]), scanned[1]
                fresh = seen.unseen(found, besides=keys)
                step = scan_arguments(cursor, SCAN_COUNT) if cursor else ()
                batch = Batch(nodes[at], fresh, step)
                if not cursor and at + 1 < len(nodes):
                    upcoming = Batch(nodes[at + 1], [], scan_arguments(0, SCAN_COUNT))
            customers = customers_of(redis, keys, replies)
            # Only keys whose customers are in hand count as sent.
            seen.update(keys)
            if customers:
                yield customers
    finally:
        for pending in (batch, upcoming):
            if pending:
                pending.close()
