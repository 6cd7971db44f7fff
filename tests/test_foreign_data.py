"""Data other programs wrote, and the ids of the original service, on fakeredis and a cluster."""

from urllib.parse import quote

import pytest

from test_listing import walk_pages

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def test_a_value_that_is_not_utf8_reads_and_lists_as_replacement_characters(
        client, redis_client, caplog):
    redis_client.hset(b"customer:bin1", mapping={b"name": b"\xff\xfe", b"city": b"Lyon"})
    client.put("/customers/plain", json={"name": "Al"})
    expected = {"id": "bin1", "name": "\ufffd\ufffd", "city": "Lyon"}
    response = client.get("/customers/bin1")
    assert response.status_code == 200
    assert response.get_json() == expected
    listed = client.get("/customers")
    assert listed.status_code == 200
    assert sorted(listed.get_json(), key=lambda customer: customer["id"]) == [
        expected, {"id": "plain", "name": "Al"}]
    assert sorted(map(str, walk_pages(client, 1))) == ["bin1", "plain"]
    assert "hold bytes that are not UTF-8" in caplog.text
    # The stored bytes stay as the other program wrote them.
    assert redis_client.hget(b"customer:bin1", b"name") == "\udcff\udcfe"


def test_a_field_name_that_is_not_utf8_reads_with_replacement_characters(client, redis_client):
    redis_client.hset(b"customer:bin2", mapping={b"na\xe9me": b"Zo\xeb", b"n": b"1"})
    expected = {"id": "bin2", "na\ufffdme": "Zo\ufffd", "n": "1"}
    assert client.get("/customers/bin2").get_json() == expected
    assert client.get("/customers").get_json() == [expected]
    assert client.get("/customers?limit=10").get_json() == [expected]
    # The customer is still writable, and its ETag works with If-Match.
    etag = client.get("/customers/bin2").headers["ETag"]
    response = client.patch("/customers/bin2", json={"n": 2},
                            headers={**MERGE_PATCH, "If-Match": etag})
    assert response.status_code == 200
    assert response.get_json() == {**expected, "n": 2}


def test_another_programs_change_of_bytes_that_are_not_utf8_changes_the_etag(
        client, redis_client):
    redis_client.hset(b"customer:bin3", mapping={b"name": b"\xff", b"city": b"Lyon"})
    first = client.get("/customers/bin3")
    redis_client.hset(b"customer:bin3", b"name", b"\xfe")
    second = client.get("/customers/bin3")
    # Both bytes read as U+FFFD, yet the customer changed: its ETag says so.
    assert first.get_json() == second.get_json() == {"id": "bin3", "name": "\ufffd",
                                                      "city": "Lyon"}
    assert first.headers["ETag"] != second.headers["ETag"]
    stale = client.patch("/customers/bin3", json={"city": "Paris"},
                         headers={**MERGE_PATCH, "If-Match": first.headers["ETag"]})
    assert stale.status_code == 412
    assert client.get("/customers/bin3", headers={
        "If-None-Match": first.headers["ETag"]}).status_code == 200
    assert client.get("/customers/bin3", headers={
        "If-None-Match": second.headers["ETag"]}).status_code == 304
    assert redis_client.hget(b"customer:bin3", b"city") == "Lyon"
    current = client.patch("/customers/bin3", json={"city": "Paris"},
                           headers={**MERGE_PATCH, "If-Match": second.headers["ETag"]})
    assert current.status_code == 200
    assert redis_client.hget(b"customer:bin3", b"city") == "Paris"


def test_field_names_that_differ_only_in_bytes_that_are_not_utf8_are_logged_and_versioned(
        client, redis_client, caplog):
    redis_client.hset(b"customer:bin4", mapping={b"n\xff": b"1", b"n\xfe": b"2"})
    first = client.get("/customers/bin4")
    assert first.status_code == 200
    # JSON has no name for either: one "n\ufffd" is sent, and the log says why.
    assert list(first.get_json()) == ["id", "n\ufffd"]
    assert "customer 'bin4' has field names that differ only in bytes" in caplog.text
    # A change to the one not shown still changes the version.
    hidden = b"n\xfe" if first.get_json()["n\ufffd"] == "1" else b"n\xff"
    redis_client.hset(b"customer:bin4", hidden, b"3")
    assert client.get("/customers/bin4").headers["ETag"] != first.headers["ETag"]


def test_a_key_that_is_not_utf8_is_left_out_of_lists_and_kept(client, redis_client, caplog):
    redis_client.hset(b"customer:\xff\xfe", "name", "Foreign")
    redis_client.hset(b"customer:", "name", "No id")
    redis_client.hset(b"customer:a\nb", "name", "Control")
    client.put("/customers/1", json={"name": "Joe"})
    assert client.get("/customers").get_json() == [{"id": "1", "name": "Joe"}]
    assert client.get("/customers?limit=1").get_json() == [{"id": "1", "name": "Joe"}]
    assert "has an id no URL can name" in caplog.text
    assert redis_client.hgetall(b"customer:\xff\xfe") == {"name": "Foreign"}


ORIGINAL_IDS = ["john@example.com", "a b", "x:y", "Zoë-東京", "a/b", "100%", "q?x=1#y",
                "+1 (555) 0100", "ümlaut", "...",
                # Other programs' keys: slashes where a path would merge or drop them.
                "/x", "/", "//", "x/", "a//b"]


@pytest.mark.parametrize("customer_id", ORIGINAL_IDS)
def test_every_listed_id_is_addressable_by_its_percent_encoded_path(
        client, redis_client, customer_id):
    # Written by the original service (or another program) straight into the database.
    redis_client.hset(f"customer:{customer_id}", mapping={"name": "Old", "n": "1"})
    [listed] = client.get("/customers").get_json()
    assert listed == {"id": customer_id, "name": "Old", "n": "1"}
    path = "/customers/" + quote(listed["id"], safe="")
    assert client.get(path).get_json() == listed
    assert client.put(path, json={"n": 2}).status_code == 204
    response = client.patch(path, json={"vip": True}, headers=MERGE_PATCH)
    assert response.get_json() == {"id": customer_id, "name": "Old", "n": 2, "vip": True}
    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.get("/customers").get_json() == []


@pytest.mark.parametrize("customer_id", ORIGINAL_IDS)
def test_a_client_creates_such_ids_with_put_and_gets_their_encoded_location(
        client, customer_id):
    path = "/customers/" + quote(customer_id, safe="")
    response = client.put(path, json={"name": "New"})
    assert response.status_code == 201
    assert response.headers["Location"] == path
    assert client.get(response.headers["Location"]).get_json() == {
        "id": customer_id, "name": "New"}


def test_a_doubled_slash_names_the_id_that_holds_it_never_a_redirect_to_another(
        client, redis_client):
    redis_client.hset("customer:x", "name", "X")
    redis_client.hset("customer:/x", "name", "Slash X")
    response = client.get("/customers//x")
    assert response.status_code == 200
    assert response.get_json() == {"id": "/x", "name": "Slash X"}
    # werkzeug's default answered 308 to /customers/x, which clients follow with the same method.
    assert client.delete("/customers//x").status_code == 204
    assert client.get("/customers").get_json() == [{"id": "x", "name": "X"}]


# What a WSGI server hands the app for /customers/%FF and the like: the path's bytes, read as
# Latin-1. werkzeug reads bytes that are not UTF-8 as U+FFFD, so each named customer "\ufffd".
NOT_UTF8_PATHS = ["/customers/\xff", "/customers/\xfe", "/customers/\xc0\xaf",
                  "/customers/\xed\xa0\x80", "/customers/\xef\xbf\xbd\xff"]


@pytest.mark.parametrize("path", NOT_UTF8_PATHS)
def test_an_id_that_is_not_utf8_in_the_url_is_400_never_another_customer(
        client, stored_keys, path):
    client.put("/customers/%EF%BF%BD", json={"name": "Replacement"})
    client.put("/customers/%EF%BF%BD%EF%BF%BD", json={"name": "Two"})
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS"):
        response = client.open("/customers/x", method=method, json={"name": "Eve"},
                               headers={"Content-Type": "application/merge-patch+json"}
                               if method == "PATCH" else {},
                               environ_overrides={"PATH_INFO": path})
        assert response.status_code == 400, method
        assert response.get_json() == {"message": (
            "the customer id is not UTF-8 once percent-decoded: URLs carry text as the "
            "percent-encoded bytes of its UTF-8 (RFC 3986 2.5)")}
    assert stored_keys() == ["customer:\ufffd", "customer:\ufffd\ufffd"]
    assert client.get("/customers/%EF%BF%BD").get_json() == {
        "id": "\ufffd", "name": "Replacement"}


@pytest.mark.parametrize("query", ["fields=%FF", "fields=a%C0%AF", "limit=%FF", "cursor=%FE",
                                   "x%FF=1", "fields=\xff"])
def test_a_query_that_is_not_utf8_is_400(client, query):
    client.put("/customers/1", json={"name": "Ada"})
    for path in ("/customers", "/customers/1"):
        response = client.get(path, environ_overrides={"QUERY_STRING": query})
        assert response.status_code == 400
        assert response.get_json()["message"].startswith(
            "the query string is not UTF-8 once percent-decoded")
    # The same text, percent-encoded from UTF-8, is read.
    response = client.get("/customers/1", environ_overrides={"QUERY_STRING": "fields=%C3%A9"})
    assert response.get_json() == {"id": "1"}


# As a server hands them over: the test client would read "//customers" as a host's name.
@pytest.mark.parametrize("path", ["/customers/", "/docs/", "/docs//index.html", "/docs/a//b",
                                  "/static/x", "//", "///"])
def test_a_path_with_a_doubled_or_trailing_slash_is_a_json_404_not_a_redirect(client, path):
    response = client.get("/", environ_overrides={"PATH_INFO": path})
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert "Location" not in response.headers


def test_leading_slashes_are_read_as_one_and_never_redirect(client):
    # werkzeug strips a path's leading slashes: no id begins the path, so none is lost.
    client.put("/customers/x", json={"name": "X"})
    for path, expected in (("//customers", [{"id": "x", "name": "X"}]),
                           ("///customers/x", {"id": "x", "name": "X"}),
                           ("//healthz", {"status": "ok"})):
        response = client.get("/", environ_overrides={"PATH_INFO": path})
        assert (response.status_code, response.get_json()) == (200, expected)
        assert "Location" not in response.headers


def test_a_type_marker_whose_value_does_not_read_leaves_the_stored_text(client, redis_client):
    # Another program's values under this service's markers: JSON has no NaN or Infinity.
    stored = {"n": "nan", "m": "-inf", "k": "abc", "b": "yes", "z": "1", "ok": "2.5"}
    markers = {"_type:n": "float", "_type:m": "float", "_type:k": "int", "_type:b": "bool",
               "_type:z": "complex", "_type:ok": "float"}
    redis_client.hset("customer:typed", mapping={**stored, **markers})
    expected = {"id": "typed", **stored, "ok": 2.5}
    assert client.get("/customers/typed").get_json() == expected
    assert client.get("/customers").get_json() == [expected]
    projected = client.get("/customers/typed?fields=n,m,ok").get_json()
    assert projected == {"id": "typed", "n": "nan", "m": "-inf", "ok": 2.5}


def test_an_expiry_another_program_set_outlives_the_services_writes(client, redis_client):
    # The service changes fields, never a key's expiry: documented in docs/storage.md.
    redis_client.hset("customer:ttl", "name", "Temp")
    redis_client.expire("customer:ttl", 1000)
    assert client.put("/customers/ttl", json={"n": 1}).status_code == 204
    response = client.patch("/customers/ttl", json={"m": 2}, headers=MERGE_PATCH)
    assert response.status_code == 200
    assert 0 < redis_client.ttl("customer:ttl") <= 1000
    # A customer created again after its key expired has none.
    redis_client.delete("customer:ttl")
    assert client.put("/customers/ttl", json={"n": 1}).status_code == 201
    assert redis_client.ttl("customer:ttl") == -1


def test_a_hash_larger_than_max_fields_written_elsewhere_still_reads_and_lists(
        client, redis_client):
    fields = {f"f{n}": str(n) for n in range(1500)}
    redis_client.hset("customer:big", mapping=fields)
    assert client.get("/customers/big").get_json() == {"id": "big", **fields}
    assert client.get("/customers").get_json() == [{"id": "big", **fields}]
    # A write that would make it larger is refused; one that shrinks it is not.
    response = client.put("/customers/big", json={"extra": 1})
    assert response.status_code == 400
    assert "MAX_FIELDS=1000" in response.get_json()["message"]
    assert redis_client.hexists("customer:big", "extra") == 0
    assert client.put("/customers/big", json={"f0": None, "f1": "one"}).status_code == 204
    assert redis_client.hlen("customer:big") == 1499
