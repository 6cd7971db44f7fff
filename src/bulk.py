"""Read many hashes from one Redis node in one round trip.

`Batch` works beneath redis-py's pipelines: a pipeline costs several times the parsing of its
replies, so the commands are packed by hand and written at once on a connection of the node's
own pool (TLS and AUTH are done), and the replies taken straight from its hiredis reader. That
reader is a redis-py internal (`connection._parser._reader`, and its "no reply yet" sentinel):
`Batch` is used only with the redis-py and hiredis versions it was tested with (FAST_READER),
and `PipelineBatch`, through redis-py's public pipeline, with any other. Only HGETALL and SCAN
(or HMGET of some fields, for a projection) are sent, all within the service's
least-privilege ACL.
"""

import logging
from importlib import metadata

from redis import exceptions as rx

from database import classified

log = logging.getLogger(__name__)
# The releases Batch was written and tested for (the pins of requirements.txt).
FAST_READER = {"redis": "8.1.", "hiredis": "3."}


class UnexpectedReply(rx.RedisError):
    """The reader gave something that is neither a reply nor "no reply yet": never a reply."""


def _fast_reader():
    """Return redis-py's "no reply yet" sentinel with the tested versions, else None."""
    try:
        versions = {name: metadata.version(name) for name in FAST_READER}
        from redis._parsers.hiredis import NOT_ENOUGH_DATA
    except (metadata.PackageNotFoundError, ImportError):
        return None
    if all(versions[name].startswith(prefix) for name, prefix in FAST_READER.items()):
        return NOT_ENOUGH_DATA
    log.info("redis %s / hiredis %s are not the versions the fast batch reader was tested "
             "with (%s): listing reads through redis-py's pipelines", versions["redis"],
             versions["hiredis"], FAST_READER)
    return None


NOT_ENOUGH_DATA = _fast_reader()


class Batch:
    """HGETALL (or HMGET of the fields asked) of many keys, then optionally a SCAN step, sent
    now on one connection, read later."""

    def __init__(self, node, keys: list, scan: tuple = (), asked: tuple = ()):
        self.pool = node.connection_pool
        self.keys = keys
        self.connection = self.pool.get_connection()
        try:
            packed = [_hmget_each(keys, asked) if asked else _hgetall_each(keys)]
            if scan:
                packed += self.connection.pack_command("SCAN", *scan)
            self.packed = b"".join(packed)
            self.scans = bool(scan)
            self.count = len(keys) + self.scans
            try:
                self.connection.send_packed_command([self.packed])
            except (rx.ConnectionError, rx.TimeoutError):
                # Once more on a new connection, as redis-py's pipelines do (see receive).
                self.connection.send_packed_command([self.packed])
        except BaseException:
            self.close()
            raise

    def receive(self) -> tuple[list, list | None]:
        """Return the replies to HGETALL or HMGET (error replies as exceptions) and the SCAN
        step's."""
        connection = self.connection
        try:
            try:
                replies = _read(connection, self.count)
            except (rx.ConnectionError, rx.TimeoutError):
                # A connection the server had closed: once more on a new one, as redis-py's
                # pipelines do (reads are safe to repeat).
                connection.disconnect()
                connection.send_packed_command([self.packed])
                replies = _read(connection, self.count)
        except BaseException:
            # Replies may be left unread: the connection must not be reused.
            connection.disconnect()
            raise
        finally:
            self.pool.release(connection)
            self.connection = None
        scanned = replies.pop() if self.scans else None
        if isinstance(scanned, Exception):
            raise classified(scanned)
        return replies, scanned

    def close(self) -> None:
        """Give the connection back with its replies unread, closed, if the batch still holds it."""
        if self.connection is not None:
            self.connection.disconnect()
            self.pool.release(self.connection)
            self.connection = None


class PipelineBatch:
    """What Batch does, through redis-py's public pipeline: sent and read in receive()."""

    def __init__(self, node, keys: list, scan: tuple = (), asked: tuple = ()):
        self.keys = keys
        self.scans = bool(scan)
        self.pipe = node.pipeline(transaction=False)
        for key in keys:
            if asked:
                self.pipe.execute_command("HMGET", key, *asked)
            else:
                self.pipe.execute_command("HGETALL", key)
        if scan:
            self.pipe.execute_command("SCAN", *scan)

    def receive(self) -> tuple[list, list | None]:
        """Return the replies to HGETALL or HMGET (error replies as exceptions) and the SCAN
        step's."""
        try:
            replies = self.pipe.execute(raise_on_error=False) if self.pipe else []
        finally:
            self.close()
        scanned = replies.pop() if self.scans else None
        if isinstance(scanned, Exception):
            raise classified(scanned)
        return replies, scanned

    def close(self) -> None:
        """Drop what the batch holds."""
        if self.pipe is not None:
            self.pipe.reset()
            self.pipe = None


def batch_class(fast: bool | None = None):
    """Return Batch with the tested versions (or when fast says so), else PipelineBatch."""
    if fast is None:
        fast = NOT_ENOUGH_DATA is not None
    return Batch if fast else PipelineBatch


def _hgetall_each(keys: list) -> bytes:
    """Return HGETALL of each key, packed as Redis reads commands."""
    text = "".join([f"*2\r\n$7\r\nHGETALL\r\n${len(key)}\r\n{key}\r\n" for key in keys])
    # Packed as text, a third faster, when every key is ASCII: then its length is its size.
    if text.isascii():
        return text.encode()
    return b"".join([b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n" % (len(key), key)
                     for key in (key.encode("utf-8", "surrogateescape") for key in keys)])


def _bulk_string(text: str) -> bytes:
    """Return text as a RESP bulk string."""
    data = text.encode("utf-8", "surrogateescape")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _hmget_each(keys: list, asked: tuple) -> bytes:
    """Return HMGET of the asked fields of each key, packed as Redis reads commands."""
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(asked) + 2)
    tail = b"".join(map(_bulk_string, asked))
    return b"".join([head + _bulk_string(key) + tail for key in keys])


def _read(connection, count: int) -> list:
    """Read count replies, error replies as exceptions."""
    # Replies hiredis already holds are taken straight from its reader: read_response per reply
    # costs as much as the parsing. Reading the socket, push messages and connection errors
    # stay read_response's.
    from hiredis import PushNotification

    parser = connection._parser
    reader = getattr(parser, "_reader", None)
    replies = []
    while len(replies) < count:
        reply = reader.gets() if reader is not None else NOT_ENOUGH_DATA
        if type(reply) is list or isinstance(reply, rx.ResponseError):
            replies.append(reply)
        elif reply is NOT_ENOUGH_DATA:
            try:
                replies.append(connection.read_response())
            except rx.ResponseError as error:
                replies.append(error)
        elif isinstance(reply, PushNotification):
            parser.handle_push_response(reply)
        else:
            # HGETALL, HMGET and SCAN answer lists or errors: anything else is a changed reader.
            raise UnexpectedReply(f"the hiredis reader gave {type(reply).__name__}: {reply!r:.80}")
    return replies
