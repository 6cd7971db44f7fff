"""The whole API suite again, over TLS as the least-privilege user of a MemoryDB-like cluster."""

import pytest

from conftest import cluster_config
from database import connect
from server import create_app
from test_api import *  # noqa: F403 - the same tests, collected here with these fixtures


# Both clients are kept for the module, not opened per test as memorydb_database is: a new
# client makes its TLS connections (a handshake each) again, and this module runs 57 tests.
@pytest.fixture(scope="module")
def admin_client(memorydb_cluster):
    """A client of the cluster as its admin user, for the tests' own set-up and checks."""
    client = connect(cluster_config(memorydb_cluster, db_username="admin",
                                    db_password=memorydb_cluster.security.admin_password))
    yield client
    client.close()


@pytest.fixture(scope="module")
def app_user_client(memorydb_cluster):
    """The service's client as it would run on MemoryDB: TLS, the CA, the app user."""
    config = cluster_config(memorydb_cluster)
    assert config.db_tls and config.db_username == "app"
    client = connect(config)
    yield client
    client.close()


@pytest.fixture(params=[pytest.param("cluster-tls-acl", marks=pytest.mark.cluster)])
def redis_client(empty_memorydb_cluster, admin_client):
    """The emptied cluster, seen by its admin user."""
    return admin_client


@pytest.fixture
def app(redis_client, memorydb_cluster, app_user_client):
    """The service over the emptied cluster, connected as the least-privilege app user."""
    return create_app(cluster_config(memorydb_cluster), app_user_client)
