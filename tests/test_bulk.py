"""The fast batch reader is fenced: used only with the tested redis-py, never trusted blindly."""

from importlib import metadata

import pytest
from redis import exceptions as rx

from bulk import FAST_READER, Batch, PipelineBatch, UnexpectedReply, _read, batch_class
from listing import topology, walk
from storage import CustomerStore
from test_listing import add_customers


def test_the_pinned_redis_and_hiredis_get_the_fast_reader():
    versions = {name: metadata.version(name) for name in FAST_READER}
    tested = all(versions[name].startswith(prefix) for name, prefix in FAST_READER.items())
    assert batch_class() is (Batch if tested else PipelineBatch)
    assert batch_class(fast=False) is PipelineBatch
    assert batch_class(fast=True) is Batch


class ChangedReader:
    """A hiredis reader whose "no reply yet" became something else (False, as before 2024)."""

    def gets(self):
        return False


class Connection:
    """Just what _read touches of a redis-py connection."""

    def __init__(self, reader):
        self._parser = type("Parser", (), {"_reader": reader})()


def test_a_reader_result_that_is_no_reply_raises_and_is_never_taken_for_one():
    with pytest.raises(UnexpectedReply, match="gave bool"):
        _read(Connection(ChangedReader()), 3)


@pytest.mark.cluster
@pytest.mark.parametrize("fast", [pytest.param(True, marks=pytest.mark.fast_reader), False])
def test_both_readers_list_and_page_the_same_customers(cluster_database, fast):
    stored = add_customers(cluster_database, 3000)
    cluster_database.set("customer:text", "not a hash")
    store = CustomerStore(cluster_database, fast_reader=fast)
    assert store.batch is (Batch if fast else PipelineBatch)
    listed = [customer["id"] for batch in walk(store) for customer in batch]
    assert sorted(listed) == sorted(stored)
    # The connections went back to their pools, ready for the next command.
    for node in topology(cluster_database)[1]:
        assert node.ping() is True


@pytest.mark.cluster
def test_a_pipeline_batch_raises_a_scan_error_and_keeps_hgetall_errors_as_replies(
        cluster_database):
    cluster_database.set("customer:text", "x")
    node = cluster_database.get_redis_connection(
        cluster_database.get_node_from_key("customer:text"))
    replies, scanned = PipelineBatch(node, ["customer:text"], (0, "COUNT", 10)).receive()
    assert isinstance(replies[0], rx.ResponseError) and "WRONGTYPE" in str(replies[0])
    assert scanned[0] == 0
    with pytest.raises(rx.ResponseError, match="invalid cursor"):
        PipelineBatch(node, [], ("not-a-cursor",)).receive()
