"""Merge many customers at once: one pipeline per primary, each customer by MERGE_SCRIPT.

Each customer is merged atomically on its own by the script PUT runs (storage.py), so a
refused one (another program's key, too many fields) leaves the others applied. A chunk is
grouped by the primary that owns each key; every primary gets its commands in one write on
one connection, all are sent before any reply is read, and WAIT (DBWAITREPLICAS) follows on
the same connection. Retry safety: the whole chunk may run again after a connection error or
a failover, because a merge applied twice is a merge applied once (database.py); the caller
draws the ids of new customers before the first attempt, so a retry writes the same keys.
A retry reports as updated a customer that an interrupted attempt created.
"""

from redis import exceptions as rx

from database import ReplicasBehind, primary_of
from storage import (
    MERGE_SHA,
    NotACustomer,
    TooManyFields,
    customer_key,
    encode,
    flat,
    refusal,
)

try:
    from hiredis import pack_command  # public in hiredis 2.1 and later, three times faster
except ImportError:
    pack_command = None


def merge_many(store, items: list) -> list:
    """Merge each (customer id, fields) as PUT does, retried as a whole; return for each True
    (created), False (updated) or the refusal (NotACustomer, TooManyFields) that left it as
    it was."""
    return store.retrying(lambda: Pending(store, items).receive())


class Pending:
    """The merges of a chunk, sent now to their primaries; receive() reads their outcomes.

    Not retried: a caller that wants retries runs merge_many on the same items instead.
    """

    def __init__(self, store, items: list):
        self.store = store
        self.items = items
        groups = {}
        for at, (customer_id, _) in enumerate(items):
            groups.setdefault(primary_of(store.redis, customer_key(customer_id)), []).append(at)
        self.sent = []
        try:
            for node, ats in groups.items():
                commands = [self._command(*items[at]) for at in ats]
                if store.wait_replicas:
                    commands.append(("WAIT", store.wait_replicas,
                                     int(store.wait_timeout * 1000)))
                connection = node.connection_pool.get_connection()
                self.sent.append((node.connection_pool, connection, ats))
                if pack_command is not None:
                    packed = b"".join([pack_command(command) for command in commands])
                else:
                    packed = b"".join(connection.pack_commands(commands))
                connection.send_packed_command([packed])
        except BaseException:
            self.close()
            raise

    def _command(self, customer_id: str, fields: dict) -> tuple:
        to_set, to_delete = encode(fields)
        return ("EVALSHA", MERGE_SHA, 1, customer_key(customer_id), self.store.max_fields,
                len(to_set), *flat(to_set), *to_delete)

    def receive(self) -> list:
        """Return the outcome of each merge (see merge_many), or raise what stopped them."""
        results = [None] * len(self.items)
        alone, failure = [], None
        try:
            while self.sent:
                pool, connection, ats = self.sent[0]
                for at in ats:
                    try:
                        reply = connection.read_response()
                    except rx.ResponseError as error:
                        reply = error  # a whole reply: the connection stays in step
                    if not isinstance(reply, Exception):
                        results[at] = reply == 1
                    elif isinstance(reply, rx.NoScriptError | rx.AskError):
                        # A node that restarted (no scripts yet) or a key that moved: that one
                        # alone, through the store, which loads the script or follows the move.
                        alone.append(at)
                    elif isinstance(refused := refusal(self.items[at][0], reply),
                                    NotACustomer | TooManyFields):
                        results[at] = refused  # another program's key, or too many fields
                    else:
                        failure = failure or refused
                if self.store.wait_replicas:
                    acknowledged = connection.read_response()
                    if acknowledged < self.store.wait_replicas:
                        failure = failure or ReplicasBehind(
                            f"{acknowledged} of {self.store.wait_replicas} replicas confirmed "
                            "a chunk of merges")
                self.sent.pop(0)
                pool.release(connection)
        finally:
            self.close()
        if failure is not None:
            raise failure
        for at in alone:
            try:
                results[at] = self.store.merge(*self.items[at])
            except (NotACustomer, TooManyFields) as refused:
                results[at] = refused
        return results

    def close(self) -> None:
        """Give back the connections whose replies are unread, closed."""
        for pool, connection, _ in self.sent:
            # Replies may be left unread: the connection must not serve another command.
            connection.disconnect()
            pool.release(connection)
        self.sent = []
