"""Nodes known down fail at once; only a connection's failure takes a node down."""

import pytest
from redis import exceptions as rx

from outages import NodeDown, Outages


def test_a_node_that_failed_a_connection_fails_at_once_until_it_is_back():
    outages = Outages()
    outages.begin()
    outages.use("10.0.0.1:6379")
    outages.failed(rx.TimeoutError("Timeout reading from socket"))
    with pytest.raises(NodeDown, match="10.0.0.1:6379 is down .*Timeout reading from socket"):
        outages.use("10.0.0.1:6379")
    outages.use("10.0.0.2:6379")  # another node is not affected
    assert outages.down() == ["10.0.0.1:6379"]
    outages.back("10.0.0.1:6379")
    outages.use("10.0.0.1:6379")


@pytest.mark.parametrize("error", [
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rx.TryAgainError("TRYAGAIN"),
    NodeDown("10.0.0.1:6379 is down"),
])
def test_answers_of_a_node_do_not_take_it_down(error):
    outages = Outages()
    outages.begin()
    outages.use("10.0.0.1:6379")
    outages.failed(error)
    assert outages.down() == []


def test_an_attempt_that_used_no_node_takes_none_down():
    outages = Outages()
    outages.use("10.0.0.1:6379")
    outages.begin()
    outages.failed(rx.ConnectionError("Connection refused"))
    assert outages.down() == []


def test_waiting_permits_are_taken_without_blocking():
    outages = Outages(waiting_threads=2)
    assert outages.try_wait() and outages.try_wait()
    assert not outages.try_wait()
    outages.done_waiting()
    assert outages.try_wait()
