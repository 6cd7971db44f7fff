"""What a client of the REST API does and gets, on fakeredis and on a real cluster."""

import gzip
import uuid

import pytest

JOE = {"name": "Joe", "lastName": "Doe", "email": "joe@example.com",
       "phone": "+1 555 0100", "balance": 1000}


def test_create_returns_the_customer_with_a_new_id_and_its_location(client):
    response = client.post("/customers", json=JOE)
    assert response.status_code == 201
    body = response.get_json()
    assert uuid.UUID(body.pop("id")).version == 4
    assert body == JOE
    assert response.headers["Location"] == f"/customers/{response.get_json()['id']}"


def test_a_created_customer_reads_back_with_the_types_it_was_sent_with(client):
    sent = {"name": "Ann", "balance": 1000, "rate": 2.5, "vip": True, "active": False,
            "zip": "02134", "big": 12345678901234567890, "negative": -3, "tiny": 1e-300}
    created = client.post("/customers", json=sent).get_json()
    response = client.get(f"/customers/{created['id']}")
    assert response.status_code == 200
    assert response.get_json() == {"id": created["id"], **sent}
    assert client.get("/customers").get_json() == [{"id": created["id"], **sent}]


def test_stored_values_are_plain_text_readable_with_redis_cli(client, redis_client):
    client.put("/customers/1", json={"name": "Joe", "balance": 1000, "vip": True})
    assert redis_client.hgetall("customer:1") == {
        "name": "Joe", "balance": "1000", "vip": "true",
        "_type:balance": "int", "_type:vip": "bool"}


def test_hashes_written_by_other_clients_read_back_as_strings(client, redis_client):
    redis_client.hset("customer:7", mapping={"name": "Kim", "balance": "12"})
    assert client.get("/customers/7").get_json() == {"id": "7", "name": "Kim", "balance": "12"}


def test_put_creates_a_customer_that_does_not_exist_with_201_and_its_location(client):
    response = client.put("/customers/1", json=JOE)
    assert response.status_code == 201
    assert response.headers["Location"] == "/customers/1"
    assert response.data == b"" and "Content-Type" not in response.headers
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE}
    assert client.put("/customers/1", json=JOE).status_code == 204


def test_put_merges_the_given_fields_and_keeps_the_others(client):
    client.put("/customers/1", json=JOE)
    response = client.put("/customers/1", json={"balance": 0})
    assert response.status_code == 204
    assert response.data == b""
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE, "balance": 0}


def test_put_with_null_removes_a_field(client):
    client.put("/customers/1", json=JOE)
    client.put("/customers/1", json={"phone": None, "balance": None})
    expected = {key: value for key, value in JOE.items() if key not in ("phone", "balance")}
    assert client.get("/customers/1").get_json() == {"id": "1", **expected}


def test_put_of_a_string_over_a_number_stores_a_string(client, redis_client):
    client.put("/customers/1", json={"balance": 5})
    client.put("/customers/1", json={"balance": "five"})
    assert client.get("/customers/1").get_json() == {"id": "1", "balance": "five"}
    assert redis_client.hgetall("customer:1") == {"balance": "five"}


def test_put_may_repeat_the_id_of_the_path(client):
    assert client.put("/customers/1", json={"id": 1, "name": "Joe"}).status_code == 201
    assert client.put("/customers/1", json={"id": "1", "age": 30}).status_code == 204
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Joe", "age": 30}


def test_get_of_a_missing_customer_is_404(client):
    response = client.get("/customers/nobody")
    assert response.status_code == 404
    assert response.get_json() == {"message": "customer nobody does not exist"}


def test_delete_removes_the_customer(client, stored_keys):
    client.put("/customers/1", json=JOE)
    response = client.delete("/customers/1")
    assert response.status_code == 204
    assert client.get("/customers/1").status_code == 404
    assert stored_keys() == []


def test_delete_of_a_missing_customer_is_204(client):
    assert client.delete("/customers/nobody").status_code == 204


def test_list_of_an_empty_database_is_an_empty_array(client):
    response = client.get("/customers")
    assert response.status_code == 200
    assert response.get_json() == []


def test_list_returns_every_customer_once(client):
    ids = {client.post("/customers", json={"n": n}).get_json()["id"] for n in range(2500)}
    listed = client.get("/customers").get_json()
    assert len(listed) == 2500
    assert {customer["id"] for customer in listed} == ids


def test_list_takes_the_id_as_everything_after_the_prefix(client, redis_client):
    redis_client.hset("customer:eu:42", "name", "Lea")
    assert client.get("/customers").get_json() == [{"id": "eu:42", "name": "Lea"}]


def test_list_returns_keys_and_values_in_any_script_as_stored(client, redis_client):
    redis_client.hset("customer:Zoë-東京", mapping={"name": "Zoë", "city": "東京"})
    client.put("/customers/plain", json={"name": "Al"})
    listed = sorted(client.get("/customers").get_json(), key=lambda customer: customer["id"])
    assert listed == [{"id": "Zoë-東京", "name": "Zoë", "city": "東京"},
                      {"id": "plain", "name": "Al"}]


def test_list_skips_keys_under_the_prefix_that_are_not_hashes(client, redis_client):
    client.put("/customers/1", json={"name": "Joe"})
    redis_client.set("customer:counter", "7")
    redis_client.rpush("customer:queue", "x")
    redis_client.hset("other:1", "name", "Not a customer")
    assert client.get("/customers").get_json() == [{"id": "1", "name": "Joe"}]


MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


@pytest.mark.parametrize(("method", "options"), [
    ("get", {}), ("put", {"json": {"name": "x"}}), ("patch", {"json": {"name": "x"}}),
    ("delete", {}), ("put", {"json": {"name": "x"}, "headers": {"If-Match": "*"}}),
    ("delete", {"headers": {"If-Match": "*"}}),
])
def test_every_method_on_another_programs_key_is_409_and_leaves_it(
        client, redis_client, method, options):
    redis_client.set("customer:counter", "7")
    redis_client.rpush("customer:queue", "x")
    if method == "patch":
        options = {**options, "headers": MERGE_PATCH}
    for key, read in (("counter", redis_client.get), ("queue", redis_client.lrange)):
        before = read(f"customer:{key}", *(() if key == "counter" else (0, -1)))
        response = getattr(client, method)(f"/customers/{key}", **options)
        assert response.status_code == 409
        assert response.get_json() == {"message": f"the key of customer {key} holds something "
                                       "that is not a customer (not a hash); it is left as it is"}
        assert read(f"customer:{key}", *(() if key == "counter" else (0, -1))) == before


def test_unknown_urls_and_methods_answer_json(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert "message" in response.get_json()
    response = client.patch("/customers")
    assert response.status_code == 405
    assert "message" in response.get_json()
    assert "POST" in response.headers["Allow"]


JSON = {"Content-Type": "application/json"}

BAD_REQUESTS = [
    # method, path, headers, body, status, words in the message
    ("post", "/customers", JSON, "{not json", 400, "not valid JSON"),
    ("post", "/customers", JSON, "", 400, "not valid JSON"),
    ("post", "/customers", JSON, "[1, 2]", 400, "JSON object"),
    ("post", "/customers", JSON, '"text"', 400, "JSON object"),
    ("post", "/customers", JSON, "null", 400, "JSON object"),
    ("post", "/customers", JSON, "{}", 400, "at least one field"),
    ("post", "/customers", JSON, '{"a": {"b": 1}}', 400, "field 'a'"),
    ("post", "/customers", JSON, '{"tags": [1]}', 400, "field 'tags'"),
    ("post", "/customers", JSON, '{"": 1}', 400, "must not be empty"),
    ("post", "/customers", JSON, '{"_type:x": "int"}', 400, "reserved"),
    ("post", "/customers", JSON, '{"x": NaN}', 400, "not valid JSON"),
    ("post", "/customers", JSON, '{"x": Infinity}', 400, "not valid JSON"),
    ("post", "/customers", JSON, '{"id": "5", "a": 1}', 400, "assigns"),
    ("post", "/customers", JSON, b'{"a": "\xff"}', 400, "not UTF-8 text"),
    ("put", "/customers/1", {"Content-Type": "application/json; charset=latin-1"},
     '{"a": "é"}'.encode("latin-1"), 400, "JSON is sent in UTF-8"),
    ("post", "/customers", JSON, "[" * 100000, 400, "not valid JSON"),
    ("post", "/customers", {"Content-Type": "application/x-www-form-urlencoded"}, "a=b",
     415, "application/json"),
    ("post", "/customers", {}, '{"a": 1}', 415, "application/json"),
    ("put", "/customers/1", {"Content-Type": "text/plain"}, '{"a": 1}', 415, "application/json"),
    ("put", "/customers/1", JSON, '{"id": "2", "a": 1}', 400, "differs"),
    ("put", "/customers/1", JSON, '{"id": true, "a": 1}', 400, "differs"),
    ("put", "/customers/1", JSON, '{"id": "1"}', 400, "at least one field"),
    ("put", "/customers/1", JSON, '{"a": [1]}', 400, "field 'a'"),
    ("put", "/customers/1", JSON, "{" + "".join(f'"a{n}": 1, ' for n in range(10)) + '"b": {}}',
     400, "field 'b'"),
    ("put", "/customers/" + "x" * 1025, JSON, '{"a": 1}', 400, "1 to 1024 characters"),
    ("put", "/customers/a%00b", JSON, '{"a": 1}', 400, "no control characters"),
    ("put", "/customers/a%0Ab", JSON, '{"a": 1}', 400, "no control characters"),
    # A typo of limit would list every customer; a flag this API lacks would be ignored.
    ("get", "/customers?limt=10", {}, None, 400,
     "unknown query parameter 'limt': GET /customers takes only limit, cursor, fields"),
    ("get", "/customers/1?limit=3", {}, None, 400, "GET /customers/1 takes only fields"),
    ("put", "/customers/1?dry_run=1", JSON, '{"a": 1}', 400,
     "unknown query parameter 'dry_run': PUT /customers/1 takes no query parameter"),
    ("patch", "/customers/1?x", {"Content-Type": "application/merge-patch+json"}, '{"a": 1}',
     400, "takes no query parameter"),
    ("delete", "/customers/1?force=1", {}, None, 400, "takes no query parameter"),
    ("post", "/customers?async=1", JSON, '{"a": 1}', 400, "takes no query parameter"),
    ("delete", "/customers/%0A", {}, None, 400, "no control characters"),
    ("get", "/customers/a%0D%0Ab", {}, None, 400, "no control characters"),
    ("put", "/customers/%C2%85", JSON, '{"a": 1}', 400, "no control characters"),
    ("put", "/customers/%2E%2E", JSON, '{"a": 1}', 400, "not . or .."),
    ("get", "/customers/a%09", {}, None, 400, "customer id"),
    ("delete", "/customers/%1B", {}, None, 400, "customer id"),
    ("post", "/customers/1", JSON, '{"a": 1}', 405, "not allowed"),
    ("get", "/nowhere/1", {}, None, 404, "not found"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "words"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_json_error_and_stores_nothing(
        client, stored_keys, method, path, headers, body, status, words):
    response = getattr(client, method)(path, headers=headers, data=body)
    assert response.status_code == status
    assert response.content_type == "application/json"
    assert words in response.get_json()["message"]
    assert stored_keys() == []


# Every route that reads a body, with the type it takes.
BODY_ROUTES = [
    ("post", "/customers", "application/json"),
    ("put", "/customers/1", "application/json"),
    ("patch", "/customers/1", "application/merge-patch+json"),
    ("post", "/customers", "application/x-ndjson"),
]


@pytest.mark.parametrize(("method", "path", "content_type"), BODY_ROUTES)
def test_a_compressed_body_is_415_naming_the_fix_and_stores_nothing(
        client, stored_keys, method, path, content_type):
    client.put("/customers/1", json={"name": "Ada"})
    before = client.get("/customers/1").get_json()
    plain = b'{"id": "1", "name": "Bob"}\n' if "ndjson" in content_type else b'{"name": "Bob"}'
    # gzip's bytes, and a plain body that says it is gzip: neither is taken as it comes.
    for body in (gzip.compress(plain), plain):
        for coding in ("gzip", " GZIP ", "br", "gzip, identity"):
            response = getattr(client, method)(path, data=body, headers={
                "Content-Type": content_type, "Content-Encoding": coding})
            assert response.status_code == 415
            assert response.get_json() == {"message": "the body must not be compressed: "
                                                      "send it without Content-Encoding"}
            assert response.headers["Accept-Encoding"] == "identity"
            if method == "patch":
                assert response.headers["Accept-Patch"] == "application/merge-patch+json"
    assert stored_keys() == ["customer:1"]
    assert client.get("/customers/1").get_json() == before
    # identity is no coding at all.
    response = getattr(client, method)(path, data=plain, headers={
        "Content-Type": content_type, "Content-Encoding": "identity"})
    assert response.status_code in (200, 201, 204)
    written = response.headers.get("Location", "/customers/1")
    assert client.get(written).get_json()["name"] == "Bob"


@pytest.mark.parametrize(("method", "path", "content_type"), BODY_ROUTES)
def test_a_transfer_coding_but_chunked_is_501_naming_the_fix_and_stores_nothing(
        client, stored_keys, method, path, content_type):
    client.put("/customers/1", json={"name": "Ada"})
    plain = b'{"id": "1", "name": "Bob"}\n' if "ndjson" in content_type else b'{"name": "Bob"}'
    # The server undoes chunked and hands the rest on: a plain body here says it is gzip.
    for coding in ("gzip, chunked", "Deflate,chunked", "compress", "chunked, gzip"):
        response = getattr(client, method)(path, data=plain, headers={
            "Content-Type": content_type, "Transfer-Encoding": coding})
        assert response.status_code == 501
        assert "no Transfer-Encoding but chunked" in response.get_json()["message"]
    assert stored_keys() == ["customer:1"]
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Ada"}


def test_a_body_over_the_limit_is_413_and_stores_nothing(redis_client, stored_keys):
    from server import create_app
    from settings import Config

    client = create_app(Config(max_body_bytes=100), redis_client).test_client()
    response = client.post("/customers", json={"name": "x" * 200})
    assert response.status_code == 413
    assert "message" in response.get_json()
    assert stored_keys() == []
