"""Field projection: ?fields= returns only the fields named (and id), read with HMGET."""

import json

import pytest

from bulk import Batch, PipelineBatch, _hmget_each
from listing import walk
from projection import arguments, customers_of
from server import create_app
from settings import Config
from storage import CustomerStore
from test_listing import add_customers, next_link

JOE = {"name": "Joe", "email": "joe@example.com", "balance": 1000, "rate": 0.5, "vip": True,
       "note": "42"}


def test_a_customer_projected_keeps_the_fields_asked_their_types_and_no_etag(client):
    client.put("/customers/1", json=JOE)
    response = client.get("/customers/1?fields=name,balance,rate,vip,note")
    assert response.status_code == 200
    assert response.get_json() == {"id": "1", "name": "Joe", "balance": 1000, "rate": 0.5,
                                   "vip": True, "note": "42"}
    assert "ETag" not in response.headers
    assert "ETag" in client.get("/customers/1").headers


@pytest.mark.parametrize(("fields", "expected"), [
    ("name", {"id": "1", "name": "Joe"}),
    ("name,name,email", {"id": "1", "name": "Joe", "email": "joe@example.com"}),
    ("unknown", {"id": "1"}),
    ("id", {"id": "1"}),
    ("id,balance,unknown", {"id": "1", "balance": 1000}),
])
def test_unknown_fields_are_absent_and_id_always_comes_back(client, fields, expected):
    client.put("/customers/1", json=JOE)
    assert client.get(f"/customers/1?fields={fields}").get_json() == expected


def test_a_projection_of_a_missing_customer_is_404_and_of_another_programs_key_409(
        client, redis_client):
    assert client.get("/customers/nobody?fields=name").status_code == 404
    redis_client.set("customer:text", "not a hash")
    response = client.get("/customers/text?fields=name")
    assert response.status_code == 409
    assert "not a customer" in response.get_json()["message"]


@pytest.mark.parametrize(("query", "words"), [
    ("fields=", "a field name must not be empty"),
    ("fields=name,,email", "a field name must not be empty"),
    ("fields=name,", "a field name must not be empty"),
    ("fields=_type:balance", "reserved"),
    ("fields=a,b,c,d", "at most MAX_FIELDS=3 fields, got 4"),
    ("fields=" + "x" * 257, "at most 256 characters"),
])
def test_a_bad_field_list_is_400_everywhere(redis_client, query, words):
    client = create_app(Config(max_fields=3), redis_client).test_client()
    client.put("/customers/1", json={"name": "Joe"})
    for path in ("/customers/1", "/customers", "/customers?limit=5"):
        response = client.get(f"{path}{'&' if '?' in path else '?'}{query}")
        assert response.status_code == 400, path
        assert words in response.get_json()["message"]


def test_lists_pages_and_exports_keep_only_the_fields_asked(client, redis_client):
    add_customers(redis_client, 120)
    client.put("/customers/joe", json=JOE)
    client.put("/customers/bare", json={"other": 1})
    whole = {customer["id"]: customer for customer in client.get("/customers").get_json()}

    def expected(names):
        return {customer_id: {"id": customer_id, **{name: customer[name] for name in names
                                                     if name in customer}}
                for customer_id, customer in whole.items()}

    listed = client.get("/customers?fields=n,balance,vip").get_json()
    assert {customer["id"]: customer for customer in listed} == expected(["n", "balance", "vip"])
    assert {"id": "bare"} in listed
    exported = client.get("/customers?fields=name", headers={"Accept": "application/x-ndjson"})
    assert {customer["id"]: customer for customer in map(json.loads, exported.data.splitlines())
            } == expected(["name"])
    url, paged = "/customers?limit=50&fields=name,vip", []
    while url:
        response = client.get(url)
        assert response.status_code == 200
        paged += response.get_json()
        url = next_link(response)
        assert url is None or "fields=name%2Cvip" in url or "fields=name,vip" in url
    assert {customer["id"]: customer for customer in paged} == expected(["name", "vip"])


def test_hmget_is_packed_as_redis_reads_it_for_any_text():
    packed = _hmget_each(["customer:é", "customer:1"], ("naïve", "_type:naïve"))
    assert packed == (b"*4\r\n$5\r\nHMGET\r\n$11\r\ncustomer:\xc3\xa9\r\n$6\r\nna\xc3\xafve\r\n"
                      b"$12\r\n_type:na\xc3\xafve\r\n"
                      b"*4\r\n$5\r\nHMGET\r\n$10\r\ncustomer:1\r\n$6\r\nna\xc3\xafve\r\n"
                      b"$12\r\n_type:na\xc3\xafve\r\n")


@pytest.mark.cluster
@pytest.mark.parametrize("fast", [pytest.param(True, marks=pytest.mark.fast_reader), False])
def test_both_readers_project_the_same_customers(cluster_database, fast):
    add_customers(cluster_database, 2000)
    cluster_database.hset("customer:joe", mapping={"naïve": "oui", "n": "7", "_type:n": "int"})
    cluster_database.hset("customer:bare", "other", "1")
    cluster_database.set("customer:text", "not a hash")
    store = CustomerStore(cluster_database, fast_reader=fast)
    assert store.batch is (Batch if fast else PipelineBatch)
    asked = arguments(("n", "naïve"))
    listed = {customer["id"]: customer for batch in walk(store, asked) for customer in batch}
    assert len(listed) == 2002
    assert listed["c5"] == {"id": "c5", "n": "5"}
    assert listed["joe"] == {"id": "joe", "n": 7, "naïve": "oui"}
    assert listed["bare"] == {"id": "bare"}
    for node in cluster_database.get_primaries():
        assert cluster_database.get_redis_connection(node).ping() is True


def test_a_key_deleted_between_scan_and_read_is_not_listed(redis_client):
    redis_client.hset("customer:here", "other", "1")
    replies = [[None, None, None], [None, None, None]]
    listed = customers_of(redis_client, ["customer:here", "customer:gone"], replies,
                          arguments(("name",)))
    assert listed == [{"id": "here"}]


def test_conditions_on_a_projected_read_name_versions_of_the_whole_customer(client):
    etag = client.put("/customers/1", json=JOE) and client.get("/customers/1").headers["ETag"]
    stale = client.get("/customers/1?fields=name", headers={"If-Match": '"0123"'})
    assert stale.status_code == 412
    unchanged = client.get("/customers/1?fields=name", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and "ETag" not in unchanged.headers
    current = client.get("/customers/1?fields=name,vip", headers={"If-Match": etag})
    assert current.status_code == 200 and "ETag" not in current.headers
    assert current.get_json() == {"id": "1", "name": "Joe", "vip": True}
    changed = client.get("/customers/1?fields=name", headers={"If-None-Match": '"0123"'})
    assert changed.get_json() == {"id": "1", "name": "Joe"}
