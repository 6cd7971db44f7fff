"""POST /customers with an Idempotency-Key creates one customer per key, whatever repeats it."""

import signal
import threading
import time
import uuid

import pytest
from redis import exceptions as rx
from redis.crc import key_slot

from conftest import cluster_config
from database import retried
from http_client import call
from idempotency import SLOTS, Created, IdempotentCreates, fingerprint, id_in_slot, record_key
from mixed_load import wait_until
from server import create_app
from service_process import ServiceProcess
from settings import ConfigError, load_config
from storage import CustomerStore, customer_key, encode, flat

ANN = {"name": "Ann", "balance": 75, "vip": True}
DAY_MS = 86400 * 1000


def post(client, body, key="order-7", **headers):
    """POST a body (a dict, or JSON text as it is) with an Idempotency-Key."""
    headers = {"Idempotency-Key": key, **headers} if key is not None else headers
    if isinstance(body, str):
        return client.post("/customers", data=body, headers={
            "Content-Type": "application/json", **headers})
    return client.post("/customers", json=body, headers=headers)


def customers(stored_keys) -> list:
    """Return the customer keys stored."""
    return [key for key in stored_keys() if key.startswith("customer:")]


def test_a_repeat_answers_the_first_response_again_and_creates_nothing(client, stored_keys):
    first = post(client, ANN)
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    customer = first.get_json()
    assert customer == {"id": customer["id"], **ANN}
    assert first.headers["Location"] == f"/customers/{customer['id']}"
    # The same parsed body: other member order, other spacing.
    again = post(client, '{ "vip": true, "balance": 75,\n "name": "Ann" }')
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    assert again.headers["Location"] == first.headers["Location"]
    assert customers(stored_keys) == [f"customer:{customer['id']}"]
    assert client.get(first.headers["Location"]).get_json() == customer


def test_the_same_key_with_another_body_is_422_and_creates_nothing(client, stored_keys):
    first = post(client, ANN).get_json()
    for other in ({**ANN, "balance": 76}, {**ANN, "balance": 75.0}, {"name": "Ann"}):
        response = post(client, other)
        assert response.status_code == 422
        assert "first sent with another body" in response.get_json()["message"]
    assert customers(stored_keys) == [f"customer:{first['id']}"]


def test_other_keys_create_other_customers_and_no_key_keeps_todays_create(
        client, stored_keys, redis_client):
    ids = {post(client, ANN, key=key).get_json()["id"] for key in ("a", "b", "!", "~" * 255)}
    plain = client.post("/customers", json=ANN)
    assert plain.status_code == 201 and "Idempotent-Replayed" not in plain.headers
    assert len(ids | {plain.get_json()["id"]}) == 5
    assert len(customers(stored_keys)) == 5
    assert sorted(key for key in stored_keys() if key.startswith("idempotency:")) == [
        record_key(key) for key in ("!", "a", "b", "~" * 255)]


def test_a_customer_of_a_thousand_typed_fields_is_created_and_replayed_whole(client):
    fields = {f"f{n}": [n, n / 2, n % 2 == 0, str(n)][n % 4] for n in range(1000)}
    first = post(client, fields)
    assert first.status_code == 201
    assert client.get(first.headers["Location"]).get_json() == first.get_json()
    assert post(client, fields).data == first.data


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "tab\there", "caf\xe9", "\x7f"])
def test_a_key_that_is_not_1_to_255_visible_ascii_characters_is_400(client, stored_keys, key):
    response = post(client, ANN, key=key)
    assert response.status_code == 400
    assert "Idempotency-Key must be 1 to 255 visible ASCII" in response.get_json()["message"]
    assert stored_keys() == []


def test_a_bad_body_with_a_key_is_400_and_leaves_the_key_unused(client, stored_keys):
    assert post(client, '{"name": null}').status_code == 400
    assert post(client, "[1]").status_code == 400
    assert stored_keys() == []
    assert post(client, ANN).status_code == 201


def test_a_compressed_body_with_a_key_is_415_and_leaves_the_key_unused(client, stored_keys):
    sent = post(client, '{"name": "Ann"}', **{"Content-Encoding": "gzip"})
    assert (sent.status_code, sent.headers["Accept-Encoding"]) == (415, "identity")
    assert stored_keys() == []
    assert post(client, ANN).status_code == 201


def test_an_import_with_a_key_is_400_and_applies_no_line(client, stored_keys):
    # A retried import would create its lines without ids again: the key would promise more.
    lines = b'{"name": "Ann"}\n{"id": "7", "name": "Bo"}\n'
    sent = post(client, lines.decode(), **{"Content-Type": "application/x-ndjson"})
    assert sent.status_code == 400
    assert "an import takes no Idempotency-Key: give each line an id" in sent.get_json()["message"]
    assert stored_keys() == []


def test_the_record_expires_after_the_ttl(redis_client, client):
    post(client, ANN)
    assert DAY_MS - 60_000 < redis_client.pttl(record_key("order-7")) <= DAY_MS
    redis_client.delete(record_key("order-7"))  # what expiry does
    assert "Idempotent-Replayed" not in post(client, ANN).headers


class LosesTheFirstReply(IdempotentCreates):
    """Creates whose first script call is applied but its reply lost, as a dropped connection."""

    lost = False

    @retried
    def _create(self, *args):
        reply = IdempotentCreates._create.__wrapped__(self, *args)
        if not self.lost:
            self.lost = True
            raise rx.ConnectionError("the reply was lost")
        return reply


def test_a_create_retried_after_a_lost_reply_is_answered_as_the_create(
        redis_client, stored_keys):
    creates = LosesTheFirstReply(CustomerStore(redis_client, retry_seconds=5), 86400)
    created = creates.create("order-7", ANN)
    assert creates.lost and not created.replayed
    assert customers(stored_keys) == [f"customer:{created.customer_id}"]
    assert creates.create("order-7", ANN) == Created(created.customer_id, created.customer,
                                                     replayed=True)


def test_ids_are_uuid4s_in_the_slot_of_the_record_of_their_key(client):
    for key in ("a", "order-7", "{tagged}x", "~" * 255):
        customer_id = post(client, ANN, key=key).get_json()["id"]
        assert uuid.UUID(customer_id).version == 4 and str(uuid.UUID(customer_id)) == customer_id
        assert key_slot(f"customer:{customer_id}".encode()) == key_slot(record_key(key).encode())
    assert all(key_slot(f"customer:{id_in_slot(slot)}".encode()) == slot
               for slot in range(SLOTS))
    assert len({id_in_slot(5) for _ in range(1000)}) == 1000


def test_a_replay_after_the_customer_was_deleted_still_creates_nothing(client, stored_keys):
    location = post(client, ANN).headers["Location"]
    assert client.delete(location).status_code == 204
    again = post(client, ANN)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert customers(stored_keys) == []


def test_a_record_key_holding_another_type_is_409_and_left_as_it_is(client, redis_client):
    redis_client.rpush(record_key("order-7"), "theirs")
    response = post(client, ANN)
    assert response.status_code == 409
    assert response.get_json()["message"] == (
        "the key of this Idempotency-Key's record holds another program's data, not a record; "
        "it is left as it is")
    assert redis_client.lrange(record_key("order-7"), 0, -1) == ["theirs"]
    # Hashes that are not records: without a fingerprint, or with only the body's.
    redis_client.hset(record_key("order-8"), "theirs", "1")
    redis_client.hset(record_key("order-9"), "fingerprint", fingerprint(ANN))
    for key in ("order-8", "order-9"):
        assert post(client, ANN, key=key).status_code == 409
    assert redis_client.hgetall(record_key("order-8")) == {"theirs": "1"}
    assert redis_client.ttl(record_key("order-8")) == -1


def died_after_its_script(redis_client, key: str, fields: dict, lease_ms: int) -> str:
    """Leave the state of a create with DBWAITREPLICAS whose process died before it answered:
    the record and customer written, with a lease ending lease_ms from now; return the id."""
    creates = IdempotentCreates(CustomerStore(redis_client), 86400)
    record = record_key(key)
    customer_id = id_in_slot(key_slot(record.encode()))
    customer = f'{{"id": "{customer_id}", "name": "Ann"}}'
    now = int(time.time() * 1000)
    IdempotentCreates._create.__wrapped__(
        creates, record, customer_key(customer_id), fingerprint(fields), customer_id, customer,
        now, now + lease_ms, flat(encode(fields)[0]))
    return customer_id


def test_a_repeat_while_the_first_is_in_progress_is_409_until_its_lease_ends(
        client, redis_client, stored_keys):
    waiting = died_after_its_script(redis_client, "in-progress", {"name": "Ann"}, 60_000)
    repeat = post(client, {"name": "Ann"}, key="in-progress")
    assert repeat.status_code == 409
    assert repeat.headers["Retry-After"] == "2"
    assert "still being processed" in repeat.get_json()["message"]
    assert customers(stored_keys) == [f"customer:{waiting}"]
    # Another body is still told apart first: 422, whatever the state of the first.
    assert post(client, {"name": "Bob"}, key="in-progress").status_code == 422

    # The lease of a request that died ends: repeats replay what it created.
    died = died_after_its_script(redis_client, "died", {"name": "Ann"}, -1)
    replay = post(client, {"name": "Ann"}, key="died")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == {"id": died, "name": "Ann"}
    assert sorted(customers(stored_keys)) == sorted([f"customer:{waiting}", f"customer:{died}"])

    # A lease that is not a number (another program wrote it) is no lease.
    redis_client.hset(record_key("died"), "pending", "soon")
    assert post(client, {"name": "Ann"}, key="died").status_code == 201


@pytest.mark.cluster
def test_a_repeat_while_the_first_waits_for_its_replica_is_409_and_one_customer_is_made(
        empty_memorydb_cluster, open_database):
    memorydb_cluster = empty_memorydb_cluster
    # Two services on one database: the first waits up to 10 s for the replica, the second
    # (the repeat's) 0.5 s, so that the repeat is answered while the first still waits.
    patient, hasty = (cluster_config(memorydb_cluster, db_wait_replicas=1, db_timeout=seconds)
                      for seconds in (20.0, 1.0))
    database, other_database = open_database(patient), open_database(hasty)
    app, other = create_app(patient, database), create_app(hasty, other_database)
    # A keyed create first, so that the primary has the script before its replica is paused.
    assert post(other.test_client(), {"warm": 1}, key="another").status_code == 201
    record = record_key("paused-replica")
    primary = next(node for node in memorydb_cluster.nodes
                   if node.port == database.get_node_from_key(record).port)
    admin = memorydb_cluster.admin(primary)
    replica_port = admin.info("replication")["slave0"]["port"]
    replica = next(node for node in memorydb_cluster.nodes if node.port == replica_port)
    answers = []
    first = threading.Thread(target=lambda: answers.append(
        post(app.test_client(), ANN, key="paused-replica")))
    memorydb_cluster.kill(replica, signal.SIGSTOP)
    try:
        first.start()
        wait_until(lambda: admin.hget(record, "pending") is not None)
        repeat = post(other.test_client(), ANN, key="paused-replica")
    finally:
        memorydb_cluster.kill(replica, signal.SIGCONT)
    first.join(30)
    try:
        assert repeat.status_code == 409 and repeat.headers["Retry-After"] == "2"
        assert answers[0].status_code == 201
        assert "Idempotent-Replayed" not in answers[0].headers
        assert admin.hget(record, "pending") is None  # the first ended its lease
        again = post(other.test_client(), ANN, key="paused-replica")
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.get_json() == answers[0].get_json()
        listed = app.test_client().get("/customers").get_json()
        assert [one for one in listed if "warm" not in one] == [answers[0].get_json()]
    finally:
        admin.close()


def test_a_record_holding_bytes_that_are_not_utf8_replays_them_as_u_fffd(client, redis_client):
    customer_id = post(client, ANN, key="foreign-bytes").get_json()["id"]
    redis_client.hset(record_key("foreign-bytes"), "customer",
                      b'{"id": "%s", "name": "\xff"}' % customer_id.encode())
    replay = post(client, ANN, key="foreign-bytes")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == {"id": customer_id, "name": "\ufffd"}


class LosesTheDatabase(IdempotentCreates):
    """Creates whose database stops answering; counts the attempts to end a lease."""

    released = 0

    def _create(self, *args):
        raise rx.ConnectionError("the database went away")

    def _release(self, record, customer_id):
        self.released += 1


def test_a_create_that_lost_the_database_leaves_its_lease_to_expire(redis_client):
    # Ending it would ask the database once more, adding its timeout to the 503.
    creates = LosesTheDatabase(CustomerStore(redis_client, wait_replicas=1), 86400)
    with pytest.raises(rx.ConnectionError):
        creates.create("lost", ANN)
    assert creates.released == 0


@pytest.mark.cluster
def test_a_create_its_replica_did_not_confirm_is_503_and_ends_its_lease(empty_memorydb_cluster,
                                                                       open_database):
    config = cluster_config(empty_memorydb_cluster, db_wait_replicas=1, db_timeout=1.0,
                            db_retry_seconds=0.5)
    app = create_app(config, open_database(config))
    assert post(app.test_client(), {"warm": 1}, key="another").status_code == 201
    record = record_key("unconfirmed")
    primary = next(node for node in empty_memorydb_cluster.nodes
                   if node.port == open_database(config).get_node_from_key(record).port)
    admin = empty_memorydb_cluster.admin(primary)
    replica = next(node for node in empty_memorydb_cluster.nodes
                   if node.port == admin.info("replication")["slave0"]["port"])
    empty_memorydb_cluster.kill(replica, signal.SIGSTOP)
    try:
        first = post(app.test_client(), ANN, key="unconfirmed")
    finally:
        empty_memorydb_cluster.kill(replica, signal.SIGCONT)
    try:
        assert first.status_code == 503 and first.headers["Retry-After"] == "2"
        written = admin.hgetall(record)
        assert "pending" not in written  # answered: no longer in progress
        again = post(app.test_client(), ANN, key="unconfirmed")
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.get_json()["id"] == written["id"]
    finally:
        admin.close()


@pytest.mark.cluster
def test_the_least_privilege_user_creates_once_with_dbwaitreplicas(empty_memorydb_cluster,
                                                                  open_database):
    config = cluster_config(empty_memorydb_cluster, db_wait_replicas=1)
    assert config.db_username == "app"
    client = create_app(config, open_database(config)).test_client()
    first = post(client, ANN)
    assert first.status_code == 201
    assert post(client, ANN).headers["Idempotent-Replayed"] == "true"
    assert post(client, {"x": 1}).status_code == 422
    assert client.get(first.headers["Location"]).get_json() == first.get_json()


@pytest.mark.cluster
@pytest.mark.parametrize("cluster", ["empty_redis_cluster", "empty_memorydb_cluster"])
def test_twenty_concurrent_requests_with_one_key_create_one_customer(request, cluster):
    cluster = request.getfixturevalue(cluster)
    # With replicas the service waits for them: a repeat in that wait is a 409, never a create.
    env = {**cluster.service_env(), "WORKERS": "2", "THREADS": "8",
           "DBWAITREPLICAS": "1" if cluster.replicas else "0"}
    start, answers = threading.Barrier(20), []

    def send():
        start.wait()
        answers.append(call(service.url + "/customers", "POST", ANN, timeout=30,
                            headers={"Idempotency-Key": "twenty"}))

    with ServiceProcess(env) as service:
        senders = [threading.Thread(target=send) for _ in range(20)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        listed = call(service.url + "/customers")[2]
    created = [(headers, body) for status, headers, body in answers if status == 201]
    busy = [status for status, _, _ in answers if status == 409]
    assert len(created) + len(busy) == 20 and (busy == [] or cluster.replicas)
    assert len({body["id"] for _, body in created}) == 1
    assert sorted(headers.get("Idempotent-Replayed", "no") for headers, _ in created) == [
        "no"] + ["true"] * (len(created) - 1)
    assert len(listed) == 1 and listed[0]["id"] == created[0][1]["id"]


@pytest.mark.parametrize(("value", "seconds"), [(None, 86400), ("60", 60), ("31536000", 31536000)])
def test_idempotency_ttl_seconds_is_read_from_the_environment(value, seconds):
    env = {} if value is None else {"IDEMPOTENCY_TTL_SECONDS": value}
    assert load_config(env).idempotency_ttl_seconds == seconds


@pytest.mark.parametrize("value", ["59", "31536001", "1.5", "day"])
def test_an_idempotency_ttl_out_of_range_stops_the_service_with_a_clear_error(value):
    with pytest.raises(ConfigError, match="IDEMPOTENCY_TTL_SECONDS must be"):
        load_config({"IDEMPOTENCY_TTL_SECONDS": value})
