"""A database outage is a 503 within seconds, and the service recovers by itself."""

import signal
import time

import pytest

from conftest import cluster_config
from errors import RETRY_AFTER_SECONDS
from local_cluster import LocalCluster
from server import create_app

pytestmark = pytest.mark.cluster


def answer_within(client, path, seconds):
    """Return the response to a GET and how long it took."""
    started = time.monotonic()
    response = client.get(path)
    return response, time.monotonic() - started


def wait_for_status(client, path, status, deadline_seconds=30):
    """GET until the status comes back, returning every other status seen on the way."""
    others = []
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        response = client.get(path)
        if response.status_code == status:
            return response, others
        others.append(response.status_code)
        time.sleep(0.2)
    pytest.fail(f"no {status} from {path} within {deadline_seconds}s; saw {others[-5:]}")


@pytest.fixture
def outage_cluster(tmp_path, redis_server_binary):
    """A cluster of this test's own, not started: the test kills and starts it; stopped after."""
    cluster = LocalCluster(redis_server_binary, tmp_path)
    yield cluster
    cluster.stop()


def test_whole_cluster_down_is_503_then_recovers_without_a_restart(outage_cluster,
                                                                   open_database):
    outage_cluster.start()
    config = cluster_config(outage_cluster, db_timeout=1.0, db_retry_seconds=1.0)
    app = create_app(config, open_database(config))
    client = app.test_client()
    for n in range(20):
        assert client.put(f"/customers/c{n}", json={"n": n}).status_code == 201

    for node in outage_cluster.nodes:
        outage_cluster.kill(node, signal.SIGKILL)

    for path in ("/customers/c1", "/customers"):
        response, seconds = answer_within(client, path, 5)
        assert response.status_code == 503
        assert response.get_json() == {"message": "the database is unavailable; try again shortly"}
        assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
        assert seconds < 5
    response = client.put("/customers/c1", json={"n": -1})
    assert response.status_code == 503

    for node in outage_cluster.nodes:
        outage_cluster.start_node(node)
    outage_cluster.wait_ok()
    response, others = wait_for_status(client, "/customers/c1", 200)
    assert set(others) <= {503}
    assert response.get_json() == {"id": "c1", "n": 1}
    listed = client.get("/customers").get_json()
    assert sorted(customer["n"] for customer in listed) == list(range(20))


def test_the_service_starts_while_the_database_is_down_and_serves_once_it_is_up(
        outage_cluster, open_database):
    config = cluster_config(outage_cluster, db_timeout=1.0, db_retry_seconds=1.0)
    client = create_app(config, open_database(config)).test_client()

    response, seconds = answer_within(client, "/customers/1", 5)
    assert response.status_code == 503
    assert seconds < 5

    outage_cluster.start()
    wait_for_status(client, "/customers/1", 404)
    assert client.put("/customers/1", json={"name": "Joe"}).status_code == 201
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Joe"}
