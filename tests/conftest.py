"""Fixtures: the app on fakeredis and on a real local Redis Cluster."""

import dataclasses
import os
import shutil
import subprocess

import fakeredis
import pytest

from database import connect
from embedded import find_redis_server
from listing import topology
from local_cluster import LocalCluster
from server import create_app
from settings import Config, load_config


def cluster_config(cluster: LocalCluster, **overrides) -> Config:
    """Return the service's config for a local cluster (as its app user when it has ACLs)."""
    return dataclasses.replace(load_config(cluster.service_env()), **overrides)


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """The redis-server the tests run: REDIS_SERVER, else the same one the service embeds."""
    return find_redis_server(os.environ.get("REDIS_SERVER"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory, redis_server_binary):
    """A real 3-primary Redis Cluster on loopback, for the whole test session."""
    with LocalCluster(redis_server_binary, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tls_redis_server_binary() -> str:
    """A redis-server built with TLS: TLS_REDIS_SERVER, else redis-server on PATH (Debian's)."""
    binary = os.environ.get("TLS_REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        if "build=" in version and int(version.split("v=")[1].split(".")[0]) >= 7:
            return binary
    message = "no redis-server 7 with TLS: apt-get install redis-server (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must run the TLS, ACL and fault tests, never skip them
    pytest.skip(message)


@pytest.fixture(scope="session")
def memorydb_cluster(tmp_path_factory, tls_redis_server_binary):
    """A MemoryDB-shaped cluster for the session: 3 shards of 2 nodes, TLS only, ACL users."""
    with LocalCluster(tls_redis_server_binary, tmp_path_factory.mktemp("memorydb"),
                      replicas=1, tls=True, acl=True) as cluster:
        yield cluster


@pytest.fixture
def empty_redis_cluster(redis_cluster):
    """The session's cluster, emptied for this test."""
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def empty_memorydb_cluster(memorydb_cluster):
    """The session's MemoryDB-shaped cluster, emptied for this test."""
    memorydb_cluster.flush()
    return memorydb_cluster


@pytest.fixture
def open_database():
    """Return connect (the service's own): every client it opens is closed after the test."""
    opened = []

    def open_(config, **options):
        opened.append(connect(config, **options))
        return opened[-1]
    yield open_
    for client in opened:
        client.close()


@pytest.fixture
def cluster_database(empty_redis_cluster, open_database):
    """The service's client of the emptied session cluster."""
    return open_database(cluster_config(empty_redis_cluster))


@pytest.fixture
def memorydb_database(empty_memorydb_cluster, open_database):
    """The service's client of the emptied MemoryDB-shaped cluster: TLS, as the app user."""
    return open_database(cluster_config(empty_memorydb_cluster))


@pytest.fixture(params=["fakeredis", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_client(request):
    """An empty database: fakeredis, then the real cluster, for every test that uses it."""
    if request.param == "fakeredis":
        return fakeredis.FakeRedis(decode_responses=True, encoding_errors="surrogateescape")
    return request.getfixturevalue("cluster_database")


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
        return sorted(key for node in topology(redis_client)[1]
                      for key in node.scan_iter(count=1000))
    return keys
