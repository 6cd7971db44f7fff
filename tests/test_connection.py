"""Connecting as to MemoryDB (TLS, a CA, an ACL user); a wrong setting is a quick, clear 503."""

import time

import pytest
import trustme

from errors import RETRY_AFTER_SECONDS
from http_client import call
from service_process import ServiceProcess

pytestmark = pytest.mark.cluster
FAST = {"WORKERS": "1", "DBTIMEOUT": "1", "DBRETRYSECONDS": "1"}
# A request may wait DBRETRYSECONDS, then one more DBTIMEOUT, and connecting may take two.
PATIENCE = 1 + 3 * 1 + 3


def test_the_service_connects_over_tls_as_the_app_user_and_is_ready(memorydb_cluster):
    for node in memorydb_cluster.nodes:
        memorydb_cluster.admin(node).execute_command("ACL LOG RESET")
    with ServiceProcess({**memorydb_cluster.service_env(), **FAST}) as service:
        assert call(service.url + "/healthz")[::2] == (200, {"status": "ok"})
        assert call(service.url + "/readyz")[::2] == (200, {"status": "ready"})
        status, _, created = call(service.url + "/customers", "POST", {"name": "Ann"})
        assert status == 201
        path = service.url + "/customers/" + created["id"]
        assert call(path, "PUT", {"name": None, "vip": True})[0] == 204
        assert call(path)[2] == {"id": created["id"], "vip": True}
        assert call(service.url + "/customers")[0] == 200
        assert call(path, "DELETE")[0] == 204
    denied = [entry for node in memorydb_cluster.nodes
              for entry in memorydb_cluster.admin(node).execute_command("ACL LOG")]
    assert denied == []


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    """A CA file that did not sign the cluster's certificates."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def wrong_settings(case, memorydb, plain, other_ca) -> dict:
    """Return the environment of one misconfiguration."""
    tls = memorydb.service_env()
    return {
        "wrong password": {**tls, "DBPASSWORD": "not-the-password"},
        "wrong CA": {**tls, "DBCACERT": other_ca},
        "TLS against a plain port": {"DBHOST": "127.0.0.1", "DBPORT": str(plain.nodes[0].port),
                                     "DBTLS": "true", "DBCACERT": tls["DBCACERT"]},
        "plain against a TLS port": {**tls, "DBTLS": "false", "DBCACERT": ""},
    }[case]


@pytest.mark.parametrize(("case", "words"), [
    ("wrong password", "invalid username-password pair"),
    ("wrong CA", "CERTIFICATE_VERIFY_FAILED"),
    ("TLS against a plain port", "Timeout"),
    ("plain against a TLS port", "Connection reset by peer"),
])
def test_a_wrong_connection_setting_is_one_clear_log_line_and_quick_503s(
        case, words, memorydb_cluster, redis_cluster, other_ca):
    env = {**wrong_settings(case, memorydb_cluster, redis_cluster, other_ca), **FAST}
    with ServiceProcess(env) as service:
        for _ in range(2):
            started = time.monotonic()
            status, headers, body = call(service.url + "/customers/1", timeout=PATIENCE + 5)
            assert (status, body) == (503, {"message": "the database is unavailable; "
                                                       "try again shortly"})
            assert headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
            assert time.monotonic() - started < PATIENCE
        assert call(service.url + "/healthz")[0] == 200
        status, _, body = call(service.url + "/readyz", timeout=PATIENCE + 5)
        assert status == 503
        assert words in body["message"]
        assert service.process.poll() is None
    assert service.process.returncode == 0
    lines = [line for line in service.printed.splitlines() if "database unavailable" in line]
    assert len(lines) == 3  # one per failed request: the start-up probe's and the two above
    assert all(words in line for line in lines)
    assert "Traceback" not in service.printed
    password = env.get("DBPASSWORD")
    assert not password or password not in service.printed
