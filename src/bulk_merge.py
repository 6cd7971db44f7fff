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
    _refusal,
    customer_key,
    encode,
    flat,
)


def merge_many(store, items: list) -> list:
    """Merge each (customer id, fields) as PUT does; return for each True (created), False
    (updated) or the refusal (NotACustomer, TooManyFields) that left it unchanged."""
    return store.retrying(_merge_all, store, items)


def _command(store, key: str, fields: dict) -> tuple:
    to_set, to_delete = encode(fields)
    return ("EVALSHA", MERGE_SHA, 1, key, store.max_fields, len(to_set), *flat(to_set),
            *to_delete)


def _merge_all(store, items: list) -> list:
    """Send every item's merge to its primary, then read the replies (see the module)."""
    groups = {}
    for at, (customer_id, _) in enumerate(items):
        groups.setdefault(primary_of(store.redis, customer_key(customer_id)), []).append(at)
    results = [None] * len(items)
    sent, alone, failure = [], [], None
    try:
        for node, ats in groups.items():
            commands = [_command(store, customer_key(items[at][0]), items[at][1]) for at in ats]
            if store.wait_replicas:
                commands.append(("WAIT", store.wait_replicas, int(store.wait_timeout * 1000)))
            connection = node.connection_pool.get_connection()
            sent.append([node.connection_pool, connection, ats, False])
            connection.send_packed_command(connection.pack_commands(commands))
        for entry in sent:
            _, connection, ats, _ = entry
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
                elif "WRONGTYPE" in str(reply) or str(reply).startswith("TOOMANYFIELDS"):
                    results[at] = _refusal(items[at][0], reply)
                else:
                    failure = failure or reply
            if store.wait_replicas:
                acknowledged = connection.read_response()
                if acknowledged < store.wait_replicas and failure is None:
                    failure = ReplicasBehind(f"{acknowledged} of {store.wait_replicas} "
                                             "replicas confirmed an import chunk")
            entry[3] = True
    finally:
        for pool, connection, _, read in sent:
            if not read:
                # Replies may be left unread: the connection must not serve another command.
                connection.disconnect()
            pool.release(connection)
    if failure is not None:
        raise failure
    for at in alone:
        try:
            results[at] = store.merge(*items[at])
        except (NotACustomer, TooManyFields) as refusal:
            results[at] = refusal
    return results
