"""Read many hashes from one Redis node in one round trip, beneath redis-py's pipelines.

A redis-py pipeline costs several times the parsing of its replies: here the commands are
packed by hand and written at once on a connection of the node's own pool (so TLS and AUTH
are done), and the replies taken from its hiredis reader. Only HGETALL and SCAN are sent,
both within the service's least-privilege ACL. Pinned redis 8.1 is what is tested.
"""

from hiredis import PushNotification
from redis import exceptions as rx
from redis._parsers.hiredis import NOT_ENOUGH_DATA


class Batch:
    """HGETALL of many keys, then optionally a SCAN step, sent now on one connection, read later."""

    def __init__(self, node, keys: list, scan: tuple = ()):
        self.pool = node.connection_pool
        self.keys = keys
        self.connection = self.pool.get_connection()
        try:
            packed = [_hgetall_each(keys)]
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
        """Return the replies to HGETALL (error replies as exceptions) and the SCAN step's."""
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
            raise scanned
        return replies, scanned

    def close(self) -> None:
        """Give the connection back with its replies unread, closed, if the batch still holds it."""
        if self.connection is not None:
            self.connection.disconnect()
            self.pool.release(self.connection)
            self.connection = None


def _hgetall_each(keys: list) -> bytes:
    """Return HGETALL of each key, packed as Redis reads commands."""
    text = "".join([f"*2\r\n$7\r\nHGETALL\r\n${len(key)}\r\n{key}\r\n" for key in keys])
    # Packed as text, a third faster, when every key is ASCII: then its length is its size.
    if text.isascii():
        return text.encode()
    return b"".join([b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n" % (len(key), key)
                     for key in map(str.encode, keys)])


def _read(connection, count: int) -> list:
    """Read count replies, error replies as exceptions."""
    # Replies hiredis already holds are taken straight from its reader (a redis-py internal):
    # read_response per reply costs as much as the parsing. Reading the socket, push messages
    # and connection errors stay read_response's.
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
