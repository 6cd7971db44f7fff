"""Fixtures: the app on fakeredis and on a real local Redis Cluster."""

import os

import fakeredis
import pytest

from database import connect
from embedded import find_redis_server
from local_cluster import LocalCluster
from server import create_app
from settings import Config
from storage import CustomerStore


def cluster_config(cluster: LocalCluster, **overrides) -> Config:
    """Return the service's config for a local cluster."""
    return Config(db_host="127.0.0.1", db_port=cluster.nodes[0].port, db_tls=False, **overrides)


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """The redis-server the tests run: REDIS_SERVER, else the same one the service embeds."""
    return find_redis_server(os.environ.get("REDIS_SERVER"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory, redis_server_binary):
    """A real 3-primary Redis Cluster on loopback, for the whole test session."""
    with LocalCluster(redis_server_binary, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(params=["fakeredis", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_client(request):
    """An empty database: fakeredis, then the real cluster, for every test that uses it."""
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(decode_responses=True)
        return
    cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    client = connect(cluster_config(cluster))
    yield client
    client.close()


@pytest.fixture
def app(redis_client):
    """The service's app over the test database."""
    return create_app(Config(), redis_client)


@pytest.fixture
def client(app):
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def stored_keys(redis_client):
    """Return a function that lists every key in the test database."""
    def keys():
        return sorted(key for node in CustomerStore(redis_client).nodes()
                      for key in node.scan_iter(count=1000))
    return keys
