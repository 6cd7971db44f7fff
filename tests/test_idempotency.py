"""POST /customers with an Idempotency-Key creates one customer per key, whatever repeats it."""

import threading
import uuid

import pytest

from conftest import cluster_config
from database import connect
from http_client import call
from idempotency import IdempotentCreates, fingerprint, record_key
from server import create_app
from service_process import ServiceProcess
from storage import CustomerStore, dumps

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


def claim(redis_client, key, fields, lease_seconds):
    """Write a key's record as a request does before its customer, with the lease it holds."""
    creates = IdempotentCreates(CustomerStore(redis_client), 86400, lease_seconds)
    drawn = str(uuid.uuid4())
    creates._begin(key, fingerprint(fields), drawn, dumps({"id": drawn, **fields}).decode())
    return creates, drawn


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


def test_the_record_expires_after_the_ttl(redis_client, client):
    post(client, ANN)
    assert DAY_MS - 60_000 < redis_client.pttl(record_key("order-7")) <= DAY_MS
    redis_client.delete(record_key("order-7"))  # what expiry does
    assert "Idempotent-Replayed" not in post(client, ANN).headers


def test_a_repeat_while_the_first_is_processed_is_409_and_creates_nothing(
        client, redis_client, stored_keys):
    claim(redis_client, "order-7", ANN, lease_seconds=60)
    response = post(client, ANN)
    assert response.status_code == 409
    assert "still being processed" in response.get_json()["message"]
    assert 50 <= int(response.headers["Retry-After"]) <= 60
    assert customers(stored_keys) == []
    assert post(client, {"other": 1}).status_code == 422


def test_a_create_cut_short_after_its_record_is_completed_by_a_repeat_with_its_id(
        client, redis_client, stored_keys):
    _, drawn = claim(redis_client, "order-7", ANN, lease_seconds=0)  # its request died
    response = post(client, ANN)
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json() == {"id": drawn, **ANN}
    assert customers(stored_keys) == [f"customer:{drawn}"]
    assert post(client, ANN).headers["Idempotent-Replayed"] == "true"


def test_a_create_cut_short_after_its_customer_is_completed_without_rewriting_it(
        client, redis_client, stored_keys):
    creates, drawn = claim(redis_client, "order-7", ANN, lease_seconds=0)
    creates._insert(drawn, ANN)
    client.put(f"/customers/{drawn}", json={"balance": 80})  # a change since
    response = post(client, ANN)
    assert response.status_code == 201
    assert response.get_json() == {"id": drawn, **ANN}  # the first response
    assert customers(stored_keys) == [f"customer:{drawn}"]
    assert client.get(f"/customers/{drawn}").get_json()["balance"] == 80


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
    assert "not a record" in response.get_json()["message"]
    assert redis_client.lrange(record_key("order-7"), 0, -1) == ["theirs"]


@pytest.mark.cluster
def test_the_least_privilege_user_creates_once_with_dbwaitreplicas(memorydb_cluster):
    memorydb_cluster.flush()
    config = cluster_config(memorydb_cluster, db_wait_replicas=1)
    assert config.db_username == "app"
    database = connect(config)
    try:
        client = create_app(config, database).test_client()
        first = post(client, ANN)
        assert first.status_code == 201
        assert post(client, ANN).headers["Idempotent-Replayed"] == "true"
        assert post(client, {"x": 1}).status_code == 422
        assert client.get(first.headers["Location"]).get_json() == first.get_json()
    finally:
        database.close()


@pytest.mark.cluster
def test_twenty_concurrent_requests_with_one_key_create_one_customer(redis_cluster):
    redis_cluster.flush()
    env = {**redis_cluster.service_env(), "WORKERS": "2", "THREADS": "8"}
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
    statuses = sorted(status for status, _, _ in answers)
    assert len(answers) == 20 and set(statuses) <= {201, 409}, statuses
    created = {body["id"] for status, _, body in answers if status == 201}
    assert len(listed) == 1 and created == {listed[0]["id"]}
    print(f"\n20 concurrent requests, one key: {statuses.count(201)} answered 201 "
          f"({sum(h.get('Idempotent-Replayed') == 'true' for s, h, _ in answers if s == 201)} "
          f"replayed), {statuses.count(409)} answered 409; 1 customer")
