"""A database that answers but refuses (full, busy with a script, short of replicas), or may evict.

Each is a 503 naming why, nothing changes, and the service serves again on the same
connections once the database does (on Valkey 8.1, and on Redis 7.0 with TLS, ACLs, replicas).
"""

import contextlib
import threading
import time

import fakeredis
import pytest
from redis import exceptions as rx

import storage
from conftest import cluster_config
from database import Refusing, classified, connect, eviction_warning
from errors import RETRY_AFTER_SECONDS
from server import create_app
from settings import Config
from test_metrics import samples

pytestmark = pytest.mark.cluster
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
FULL = "the database refuses: it is full (maxmemory reached) and takes no writes"


@pytest.fixture(params=["valkey", "redis-7-tls"])
def refusing(request, open_database):
    """The app over an emptied cluster, and a function that sets a config on every primary,
    put back after the test."""
    name = "empty_redis_cluster" if request.param == "valkey" else "empty_memorydb_cluster"
    cluster = request.getfixturevalue(name)
    app = create_app(cluster_config(cluster), open_database(cluster_config(cluster)))
    changed = {}

    def configure(**settings):
        for node in cluster.primary_nodes():
            admin = cluster.admin(node)
            for setting, value in settings.items():
                before = admin.config_get(setting)[setting]
                changed.setdefault((node.port, setting), (admin, before))
                admin.config_set(setting, value)

    try:
        yield cluster, app.test_client(), configure
    finally:
        for (_, setting), (admin, value) in changed.items():
            admin.config_set(setting, value)


def writes(client) -> list:
    """Send one of each kind of write; return each (name, response)."""
    etag = client.get("/customers/1").headers["ETag"]
    return [
        ("PUT If-Match", client.put("/customers/1", json={"name": "Changed"},
                                    headers={"If-Match": etag})),
        ("PUT new", client.put("/customers/new", json={"name": "New"})),
        ("PUT", client.put("/customers/1", json={"name": "Changed"})),
        ("PATCH", client.patch("/customers/1", json={"name": "Changed"}, headers=MERGE_PATCH)),
        ("POST", client.post("/customers", json={"name": "New"})),
        ("POST Idempotency-Key", client.post("/customers", json={"name": "New"},
                                             headers={"Idempotency-Key": "refused-1"})),
        ("import", client.post("/customers", data=b'{"id": "i1", "name": "New"}\n{"name": "N"}\n',
                               headers={"Content-Type": "application/x-ndjson"})),
    ]


def test_a_full_database_answers_writes_503_and_serves_again_once_it_has_room(refusing):
    cluster, client, configure = refusing
    for customer_id in ("1", "2"):
        client.put(f"/customers/{customer_id}", json={"name": "Ada"})
    configure(**{"maxmemory": "1", "maxmemory-policy": "noeviction"})
    before = samples(client)
    for name, response in writes(client):
        assert response.status_code == 503, name
        assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
        assert response.get_json()["message"].startswith(FULL), name
    refused = ("customers_database_errors_total", (("kind", "Refusing OOM"),))
    assert samples(client).get(refused, 0) - before.get(refused, 0) >= 7
    # Reads, and deletes (which free memory), still work.
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Ada"}
    assert sorted(client.get("/customers").get_json(), key=str) == [
        {"id": "1", "name": "Ada"}, {"id": "2", "name": "Ada"}]
    assert client.delete("/customers/2").status_code == 204
    assert client.get("/readyz").status_code == 200
    configure(maxmemory="0")
    # The same connections serve: a refused conditional write once left one inside MULTI,
    # where the next request's commands were only queued (a 201 for nothing stored).
    for name, response in writes(client):
        assert response.status_code in (200, 201, 204), (name, response.get_data())
    listed = {customer["id"]: customer for customer in client.get("/customers").get_json()}
    assert listed["1"] == {"id": "1", "name": "Changed"}
    assert {"new", "i1"} <= set(listed)
    assert "2" not in listed
    assert client.get("/readyz").status_code == 200


def test_a_database_short_of_replicas_refuses_writes_with_503(refusing):
    cluster, client, configure = refusing
    client.put("/customers/1", json={"name": "Ada"})
    # More replicas than any shard has: every write is refused (NOREPLICAS).
    configure(**{"min-replicas-to-write": "5"})
    for name, response in writes(client):
        assert response.status_code == 503, name
        assert "too few replicas are in sync" in response.get_json()["message"], name
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Ada"}
    configure(**{"min-replicas-to-write": "0"})
    assert client.put("/customers/1", json={"name": "Bob"}).status_code == 204
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Bob"}


@contextlib.contextmanager
def long_script(cluster, node):
    """Run a script that loops on node (another program's, say) until killed, at most 60 s."""
    runner = node.client(**cluster.client_options)

    def run():
        with contextlib.suppress(rx.ResponseError):  # "Script killed by user"
            runner.eval("local n = 0 while n < tonumber(ARGV[1]) do n = n + 1 end", 0, 10**10)

    def probe(command):
        with node.client(**cluster.client_options) as probing:
            return probing.execute_command(command)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                probe("PING")
            except rx.ResponseError as error:
                assert str(error).startswith("BUSY")
                break
            time.sleep(0.05)
        else:
            pytest.fail("the script did not make the node busy within 10 s")
        yield
    finally:
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(rx.ResponseError):
                probe("SCRIPT KILL")
            thread.join(0.2)
        runner.close()


def test_a_database_busy_with_a_script_answers_503_and_serves_again_once_it_ends(refusing):
    cluster, client, configure = refusing
    client.put("/customers/1", json={"name": "Ada"})
    configure(**{"busy-reply-threshold": "100"})
    node = next(node for node in cluster.primary_nodes() if owns(cluster.admin(node), "customer:1"))
    with long_script(cluster, node):
        for response in (client.get("/customers/1"), client.get("/customers"),
                         client.put("/customers/1", json={"name": "Bob"}),
                         client.delete("/customers/1")):
            assert response.status_code == 503
            assert response.get_json()["message"] == (
                "the database refuses: it is busy running a script; try again shortly")
        assert client.get("/readyz").status_code == 503
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Ada"}
    assert client.get("/readyz").status_code == 200


def owns(admin, key: str) -> bool:
    """Tell whether a node serves a key (another answers MOVED)."""
    try:
        admin.exists(key)
    except rx.MovedError:
        return False
    return True


# As redis-py gives them: it drops OOM, which it has a class for, into status_code, and keeps
# the others' word.
@pytest.mark.parametrize(("error", "reason"), [
    (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.",
                         status_code="OOM"), "full"),
    # Should a release give BUSY a class of its own, its word moves the same way.
    (rx.ResponseError("Valkey is busy running a script.", status_code="BUSY"),
     "busy running a script"),
    (rx.ResponseError("BUSY Valkey is busy running a script. You can only call SCRIPT KILL or "
                      "SHUTDOWN NOSAVE."), "busy running a script"),
    (rx.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"),
     "could not save"),
    (rx.ResponseError("NOREPLICAS Not enough good replicas to write."), "too few replicas"),
    # Redis 6.2 (a MemoryDB engine) wraps what a script's command met.
    (rx.ResponseError("Error running script (call to f_a14f1a75f6bf81a129621b82f9ade11736966313): "
                      "@user_script:1: @user_script: 1: -OOM command not allowed when used "
                      "memory > 'maxmemory'."), "full"),
])
def test_each_refusal_reads_as_the_database_refusing(error, reason):
    assert isinstance(classified(error), Refusing)
    assert reason in classified(error).reason
    for other in (rx.ResponseError("unknown command 'X'"), rx.ResponseError(
            "Error running script (call to f_0): @user_script:1: WRONGTYPE not a hash")):
        assert classified(other) is other


def test_a_primary_that_may_evict_the_services_keys_is_named_in_a_warning(refusing, caplog):
    cluster, _, configure = refusing
    configure(**{"maxmemory-policy": "noeviction"})
    evicting = cluster.primary_nodes()[0]
    cluster.admin(evicting).config_set("maxmemory-policy", "allkeys-lru")
    # A client of its own: the policies are read once a primary, by its keeper.
    database = connect(cluster_config(cluster))
    try:
        database.ping()
        deadline = time.monotonic() + 10
        while "maxmemory-policy" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        database.close()
    warnings = [record.getMessage() for record in caplog.records
                if "maxmemory-policy" in record.getMessage()]
    assert warnings == [
        f"database node 127.0.0.1:{evicting.port} has maxmemory-policy allkeys-lru: when it is "
        "full, customers can be evicted: a write answered 201 or 204 could later vanish; set it "
        "to noeviction"]


@pytest.mark.parametrize(("policy", "words"), [
    ("noeviction", None), (None, None),
    ("volatile-lru", "idempotency records"), ("volatile-ttl", "idempotency records"),
    ("allkeys-lfu", "customers can be evicted"), ("allkeys-random", "customers can be evicted"),
])
def test_each_eviction_policy_reads_as_what_it_does_to_the_services_keys(policy, words):
    warning = eviction_warning(policy)
    assert warning is None if words is None else words in warning


@pytest.mark.parametrize(("reply", "status", "message"), [
    ("BUSY Redis is busy running a script.", 503,
     "the database refuses: it is busy running a script; try again shortly"),
    ("ERR unknown command 'HGETALL'", 500, "internal error"),
])
def test_an_error_reply_that_reaches_the_app_unread_is_503_if_a_refusal_else_a_logged_500(
        monkeypatch, caplog, reply, status, message):
    def failing(*command):
        raise rx.ResponseError(reply)

    # As if a path of this code missed database.classified: the app's handler still reads it.
    monkeypatch.setattr(storage, "on_primary", failing)
    monkeypatch.setattr(storage, "refusal", lambda customer_id, error: error)
    client = create_app(Config(), fakeredis.FakeRedis(decode_responses=True)).test_client()
    response = client.get("/customers/1")
    assert (response.status_code, response.get_json()) == (status, {"message": message})
    assert ("unhandled error" in caplog.text) == (status == 500)
