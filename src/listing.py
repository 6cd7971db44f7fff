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

from hiredis import PushNotification
from redis import exceptions as rx
from redis._parsers.hiredis import NOT_ENOUGH_DATA

from storage import KEY_PREFIX, UNAVAILABLE, CustomerStore, decode

log = logging.getLogger(__name__)
SCAN_COUNT = 1000
MATCH = KEY_PREFIX + "*"
CURSOR_VERSION = 1
RESUME_PAUSE_SECONDS = 0.5
HELLO_2 = b"*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n"
HELLO_3 = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"


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
        raise rx.ClusterError(f"the cluster announces primaries it cannot reach: {names}")
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
    raise failure or rx.ClusterError("no node of the cluster is known")


def fetch(redis, node, keys) -> list:
    """Read whole customers from one node in one round trip, skipping keys gone or retyped."""
    if not keys:
        return []
    customers = []
    start = len(KEY_PREFIX)
    for key, raw in zip(keys, hgetall_many(node, keys), strict=True):
        if isinstance(raw, Exception):
            if isinstance(raw, rx.AskError):
                # MOVED or ASK: a resharding moved the key; the cluster client follows it.
                raw = redis.hgetall(key)
            elif "WRONGTYPE" in str(raw):
                continue
            else:
                raise raw
        elif type(raw) is list:
            # RESP2 sends a hash as a flat list of names and values.
            pairs = iter(raw)
            raw = dict(zip(pairs, pairs, strict=True))
        if raw:
            customers.append(decode(key[start:], raw))
    return customers


def hgetall_many(node, keys) -> list:
    """Send HGETALL of every key in one write; return the replies, error replies as exceptions."""
    # A redis-py pipeline costs several times the parsing itself: pack and read directly,
    # on a connection of the node's pool (already through TLS, AUTH and HELLO).
    packed = b"".join(b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n" % (len(key), key)
                      for key in map(str.encode, keys))
    pool = node.connection_pool
    connection = pool.get_connection()
    try:
        resp3 = str(connection.get_protocol()) == "3"
        if resp3:
            # hiredis builds RESP3's maps several times slower than RESP2's flat lists: the
            # batch is read in RESP2, and the connection switched back before anyone else uses it.
            packed = HELLO_2 + packed + HELLO_3
        # A connection the server closed meanwhile is dropped and the batch sent once more,
        # as redis-py's pipelines do (reads are safe to repeat).
        replies = connection.retry.call_with_retry(
            lambda: _exchange(connection, packed, len(keys) + 2 * resp3),
            lambda error: connection.disconnect())
        if resp3:
            switched = replies.pop()
            if isinstance(switched, Exception):
                raise switched
            if not isinstance(switched, dict):
                raise rx.ConnectionError("the connection did not switch back to RESP3")
            del replies[0]
        return replies
    except BaseException:
        # Replies may be left unread, or the connection left in RESP2: it must not be reused.
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _exchange(connection, packed: bytes, count: int) -> list:
    """Send packed commands and read count replies, error replies as exceptions."""
    connection.send_packed_command([packed])
    # Replies hiredis already holds are taken from its reader (redis-py internals, pinned
    # redis 8.1): read_response per reply costs as much as parsing. Reading the socket,
    # push messages and connection errors stay read_response's.
    parser = connection._parser
    reader = getattr(parser, "_reader", None)
    replies = []
    while len(replies) < count:
        reply = reader.gets() if reader is not None else NOT_ENOUGH_DATA
        if type(reply) is list:
            replies.append(reply)
        elif reply is NOT_ENOUGH_DATA:
            try:
                replies.append(connection.read_response())
            except rx.ResponseError as error:
                replies.append(error)
        elif isinstance(reply, PushNotification):
            parser.handle_push_response(reply)
        else:
            replies.append(reply)
    return replies


def scan(node, cursor: int, count: int) -> tuple[int, list]:
    """Run one SCAN step for customer hashes on one node."""
    return node.scan(cursor, match=MATCH, count=count, _type="hash")


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

    def unseen(self, keys) -> list:
        """Return the keys not recorded yet, each once, in their order."""
        keys = dict.fromkeys(keys)
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
    """Yield every customer once; after an outage mid-walk, walk again skipping those sent."""
    seen = SeenKeys()
    sent = False
    deadline = None
    while True:
        try:
            for node in topology(store.redis)[1]:
                cursor = None
                while cursor != 0:
                    cursor, keys = scan(node, cursor or 0, SCAN_COUNT)
                    fresh = seen.unseen(keys)
                    customers = fetch(store.redis, node, fresh)
                    # Only keys whose customers are in hand count as sent.
                    seen.update(fresh)
                    sent = sent or bool(customers)
                    yield from customers
            return
        except UNAVAILABLE as error:
            # Before the first customer the caller can still answer 503; after it, resume.
            if not sent:
                raise
            # Within the same budget as any other request (DBRETRYSECONDS), so that a slow
            # database cannot hold the service's threads with walks that wait.
            deadline = deadline or time.monotonic() + store.retry_seconds
            if time.monotonic() > deadline:
                raise
            log.warning("listing interrupted (%s); walking again past what was sent", error)
            time.sleep(RESUME_PAUSE_SECONDS)
