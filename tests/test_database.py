"""Retries ride out brief outages only; DBWAITREPLICAS acknowledges a write only once replicated."""

import time

import pytest
from redis import exceptions as rx

from conftest import cluster_config
from database import Retrying, is_transient, on_primary
from errors import RETRY_AFTER_SECONDS
from outages import Outages
from server import create_app


def wrapped(error: Exception) -> Exception:
    """Return error as redis-py's cluster client raises it when it cannot connect at all."""
    try:
        raise rx.RedisClusterException(f"Redis Cluster cannot be connected: {error}") from error
    except rx.RedisClusterException as outer:
        return outer


@pytest.mark.parametrize("error", [
    rx.ConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused."),
    rx.TimeoutError("Timeout reading from socket"),
    rx.ClusterDownError("CLUSTERDOWN The cluster is down"),
    rx.TryAgainError("TRYAGAIN"),
    rx.MovedError("3999 127.0.0.1:6381"),
    rx.ReadOnlyError("You can't write against a read only replica."),
    wrapped(rx.ConnectionError("Error while reading: Connection reset by peer")),
])
def test_errors_of_a_failover_or_an_outage_are_retried(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    rx.AuthenticationError("invalid username-password pair or user is disabled."),
    rx.NoPermissionError("this user has no permissions to run the 'set' command"),
    wrapped(rx.AuthenticationError("invalid username-password pair")),
    wrapped(rx.ConnectionError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")),
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rx.DataError("Invalid input"),
])
def test_errors_that_waiting_cannot_mend_are_not_retried(error):
    assert not is_transient(error)


@pytest.mark.cluster
@pytest.mark.parametrize(("replicas", "status"), [(1, 204), (2, 503)])
def test_a_write_is_acknowledged_only_when_enough_replicas_confirm_it(
        empty_memorydb_cluster, open_database, replicas, status):
    config = cluster_config(empty_memorydb_cluster, db_wait_replicas=replicas,
                            db_retry_seconds=0.5, db_timeout=1.0)
    client = create_app(config, open_database(config)).test_client()
    for n in range(3):
        response = client.put(f"/customers/{n}", json={"n": n, "gone": None})
        assert response.status_code == (201 if status == 204 else status)
    assert client.delete("/customers/0").status_code == status
    if status == 503:
        assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)

    # Conditional writes wait too: a PATCH, and a PUT and a DELETE with If-Match.
    patch = client.patch("/customers/1", json={"n": 10},
                         headers={"Content-Type": "application/merge-patch+json"})
    assert patch.status_code == (200 if status == 204 else 503)
    etag = client.get("/customers/1").headers["ETag"]
    response = client.put("/customers/1", json={"n": 11}, headers={"If-Match": etag})
    assert response.status_code == status
    etag = client.get("/customers/1").headers["ETag"]
    assert client.delete("/customers/1", headers={"If-Match": etag}).status_code == status


def test_retries_wait_out_a_brief_outage_but_not_a_long_one():
    attempts = []

    def flaky(failures):
        attempts.append(1)
        if len(attempts) <= failures:
            raise rx.ConnectionError("Connection refused")
        return "answer"

    policy = Retrying(None, seconds=1.0)
    assert policy(flaky, 2) == "answer"
    assert len(attempts) == 3
    attempts.clear()
    started = time.monotonic()
    with pytest.raises(rx.ConnectionError):
        policy(flaky, 1000)
    assert len(attempts) > 1
    assert time.monotonic() - started < 1.5


def test_a_call_finding_every_waiting_permit_taken_fails_after_one_attempt():
    attempts = []

    def failing():
        attempts.append(1)
        raise rx.ConnectionError("Connection refused")

    outages = Outages(waiting_threads=1)
    policy = Retrying(None, seconds=5.0, outages=outages)
    assert outages.try_wait()  # another thread waits
    try:
        with pytest.raises(rx.ConnectionError):
            policy(failing)
        assert len(attempts) == 1
    finally:
        outages.done_waiting()


@pytest.mark.cluster
def test_a_read_or_write_sent_to_a_former_owner_follows_the_move(cluster_database):
    redis = cluster_database
    redis.hset("customer:moved", mapping={"name": "Joe"})
    slot = redis.keyslot("customer:moved")
    owner = redis.get_node_from_key("customer:moved")
    stale = next(node for node in redis.get_primaries() if node.name != owner.name)
    # As after a resharding the client has not heard of: its table names the wrong node.
    redis.nodes_manager.slots_cache[slot] = [stale]

    command = ("HSET", "customer:moved", "email", "joe@example.com")
    assert on_primary(redis, "customer:moved", *command) == 1
    assert redis.hgetall("customer:moved") == {"name": "Joe", "email": "joe@example.com"}
    assert redis.get_node_from_key("customer:moved").name == owner.name


@pytest.mark.cluster
def test_updates_still_apply_on_nodes_that_lost_their_scripts(redis_cluster, cluster_database):
    client = create_app(cluster_config(redis_cluster), cluster_database).test_client()
    assert client.put("/customers/1", json={"name": "Joe", "age": 39}).status_code == 201
    for node in redis_cluster.nodes:
        redis_cluster.admin(node).script_flush()  # as after a restart without the AOF
    assert client.put("/customers/1", json={"age": "unknown"}).status_code == 204
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Joe", "age": "unknown"}
