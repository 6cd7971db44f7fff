"""PATCH with JSON merge patches, ETags and conditional writes, on fakeredis and a real cluster."""

import threading

import pytest

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
JOE = {"name": "Joe", "email": "joe@example.com", "balance": 1000}


def patch(client, path, body, **headers):
    """Send a JSON merge patch."""
    return client.patch(path, json=body, headers={**MERGE_PATCH, **headers})


def etag_of(client, path):
    """Return the ETag of a GET."""
    return client.get(path).headers["ETag"]


def test_a_customer_read_carries_a_strong_etag_that_changes_with_it(client):
    client.put("/customers/1", json=JOE)
    first = client.get("/customers/1").headers["ETag"]
    assert first.startswith('"') and first.endswith('"')
    assert etag_of(client, "/customers/1") == first
    client.put("/customers/1", json={"balance": 1001})
    assert etag_of(client, "/customers/1") != first


def test_equal_content_has_equal_etags_whatever_the_writer(client, redis_client):
    client.put("/customers/1", json={"name": "Kim"})
    redis_client.hset("customer:2", "name", "Kim")
    client.put("/customers/2", json={"id": "2"} | {"x": 1})
    client.put("/customers/2", json={"x": None})
    tag1, tag2 = etag_of(client, "/customers/1"), etag_of(client, "/customers/2")
    assert tag1 != tag2  # the id is part of the content
    redis_client.hset("customer:1", "name", "Lee")
    assert etag_of(client, "/customers/1") != tag1


def test_if_none_match_with_the_current_etag_is_304_without_a_body(client):
    client.put("/customers/1", json=JOE)
    tag = etag_of(client, "/customers/1")
    for header in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        response = client.get("/customers/1", headers={"If-None-Match": header})
        assert response.status_code == 304
        assert response.data == b""
        assert response.headers["ETag"] == tag
    response = client.get("/customers/1", headers={"If-None-Match": '"other"'})
    assert response.status_code == 200
    assert response.get_json() == {"id": "1", **JOE}


def test_patch_merges_fields_and_null_removes_one(client):
    client.put("/customers/1", json=JOE)
    response = patch(client, "/customers/1", {"balance": 5, "email": None, "vip": True})
    assert response.status_code == 200
    assert response.content_type == "application/json"
    expected = {"id": "1", "name": "Joe", "balance": 5, "vip": True}
    assert response.get_json() == expected
    assert response.headers["ETag"] == etag_of(client, "/customers/1")
    assert client.get("/customers/1").get_json() == expected


def test_an_empty_patch_changes_nothing(client):
    client.put("/customers/1", json=JOE)
    response = patch(client, "/customers/1", {})
    assert response.status_code == 200
    assert response.get_json() == {"id": "1", **JOE}


def test_patch_of_a_missing_customer_is_404_and_creates_nothing(client, stored_keys):
    for headers in ({}, {"If-Match": "*"}):
        response = patch(client, "/customers/nobody", {"name": "x"}, **headers)
        assert response.status_code == 404
        assert response.get_json() == {"message": "customer nobody does not exist"}
    assert stored_keys() == []


def test_patch_of_a_key_that_is_not_a_hash_is_409_and_leaves_it(client, redis_client):
    redis_client.set("customer:counter", "7")
    assert patch(client, "/customers/counter", {"name": "x"}).status_code == 409
    assert redis_client.get("customer:counter") == "7"


def test_a_patch_that_would_remove_every_field_is_422_and_changes_nothing(client):
    client.put("/customers/1", json={"name": "Joe"})
    response = patch(client, "/customers/1", {"name": None, "other": None})
    assert response.status_code == 422
    assert "DELETE" in response.get_json()["message"]
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Joe"}


@pytest.mark.parametrize(("headers", "body", "status", "words"), [
    ({"Content-Type": "application/json"}, '{"a": 1}', 415, "merge-patch+json"),
    ({}, '{"a": 1}', 415, "merge-patch+json"),
    (MERGE_PATCH, "[1]", 400, "JSON object"),
    (MERGE_PATCH, "null", 400, "JSON object"),
    (MERGE_PATCH, "{oops", 400, "not valid JSON"),
    (MERGE_PATCH, '{"a": {"b": null}}', 400, "field 'a'"),
    (MERGE_PATCH, '{"id": "2"}', 400, "differs"),
    (MERGE_PATCH, '{"_type:a": "int"}', 400, "reserved"),
])
def test_bad_patches_are_a_clear_json_error_and_change_nothing(client, headers, body, status,
                                                               words):
    client.put("/customers/1", json=JOE)
    response = client.patch("/customers/1", headers=headers, data=body)
    assert response.status_code == status
    assert words in response.get_json()["message"]
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE}


def test_writes_with_the_current_etag_in_if_match_succeed(client):
    client.put("/customers/1", json=JOE)
    tag = etag_of(client, "/customers/1")
    response = client.put("/customers/1", json={"balance": 1}, headers={"If-Match": tag})
    assert response.status_code == 204
    tag = etag_of(client, "/customers/1")
    response = patch(client, "/customers/1", {"balance": 2}, **{"If-Match": f'"x", {tag}'})
    assert response.status_code == 200
    response = client.delete("/customers/1", headers={"If-Match": response.headers["ETag"]})
    assert response.status_code == 204
    assert client.get("/customers/1").status_code == 404


@pytest.mark.parametrize(("method", "body"), [
    ("put", {"json": {"balance": 0}}),
    ("patch", {"json": {"balance": 0}, "headers": MERGE_PATCH}),
    ("delete", {}),
])
def test_writes_with_an_old_etag_are_412_and_change_nothing(client, method, body):
    client.put("/customers/1", json=JOE)
    old = etag_of(client, "/customers/1")
    client.put("/customers/1", json={"balance": 999})
    for if_match in (old, f"W/{etag_of(client, '/customers/1')}"):
        headers = {**body.get("headers", {}), "If-Match": if_match}
        response = getattr(client, method)("/customers/1", json=body.get("json"),
                                           headers=headers)
        assert response.status_code == 412
        assert response.content_type == "application/json"
        assert "version" in response.get_json()["message"]
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE, "balance": 999}


def test_if_match_on_a_missing_customer_is_412_for_put_and_delete(client, stored_keys):
    assert client.put("/customers/1", json=JOE, headers={"If-Match": "*"}).status_code == 412
    assert client.delete("/customers/1", headers={"If-Match": '"abc"'}).status_code == 412
    assert stored_keys() == []


def test_put_with_if_none_match_star_creates_only_when_absent(client):
    headers = {"If-None-Match": "*"}
    assert client.put("/customers/1", json=JOE, headers=headers).status_code == 201
    assert client.put("/customers/1", json={"name": "Ann"}, headers=headers).status_code == 412
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE}


def test_concurrent_writers_using_if_match_lose_no_update(app):
    writers, increments = 8, 15
    app.test_client().put("/customers/counter", json={"n": 0})
    conflicts = []
    failures = []

    def increment():
        client = app.test_client()
        for _ in range(increments):
            for _attempt in range(500):
                read = client.get("/customers/counter")
                n = read.get_json()["n"]
                response = patch(client, "/customers/counter", {"n": n + 1},
                                 **{"If-Match": read.headers["ETag"]})
                if response.status_code == 200:
                    break
                if response.status_code != 412:
                    failures.append(response.status_code)
                    return
                conflicts.append(1)

    threads = [threading.Thread(target=increment) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert app.test_client().get("/customers/counter").get_json()["n"] == writers * increments
    print(f"{writers} writers x {increments} increments: {len(conflicts)} answered 412 and retried")


def test_a_write_whose_customer_keeps_changing_gives_up_as_unavailable(redis_client):
    from database import UNAVAILABLE
    from storage import WATCH_ATTEMPTS, Contended, CustomerStore

    store = CustomerStore(redis_client)
    store.merge("1", {"n": 0})
    changes = []

    def meddling_condition(version):
        changes.append(version)
        redis_client.hset("customer:1", "n", str(len(changes)))  # another writer, every time
        return True

    with pytest.raises(Contended) as raised:
        store.merge_if("1", {"n": -1}, meddling_condition)
    assert isinstance(raised.value, UNAVAILABLE)
    assert len(changes) == WATCH_ATTEMPTS
    assert store.get("1") == {"id": "1", "n": WATCH_ATTEMPTS}  # the int marker stays


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_condition_header_is_no_condition(client, header, value):
    client.put("/customers/1", json=JOE)
    read = client.get("/customers/1", headers={header: value})
    assert read.status_code == 200
    assert read.get_json() == {"id": "1", **JOE}
    assert read.headers["ETag"] == etag_of(client, "/customers/1")
    written = client.put("/customers/1", json={"balance": 5}, headers={header: value})
    assert written.status_code == 204
    assert client.delete("/customers/1", headers={header: value}).status_code == 204
    assert client.get("/customers/1").status_code == 404


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.parametrize("value", ['"unterminated', '"a" "b"', ",", 'W/"', '"a";x'])
def test_a_condition_header_that_names_no_etag_is_400_and_changes_nothing(client, header, value):
    # werkzeug reads such a header as absent: the write would have run unconditionally.
    client.put("/customers/1", json=JOE)
    for method, kwargs in (("get", {}), ("get", {"query_string": "fields=name"}),
                           ("put", {"json": {"balance": 0}}),
                           ("patch", {"json": {"balance": 0}, "headers": MERGE_PATCH}),
                           ("delete", {})):
        headers = {**kwargs.pop("headers", {}), header: value}
        response = getattr(client, method)("/customers/1", headers=headers, **kwargs)
        assert response.status_code == 400, (method, response.data)
        assert f"{header} must be * or entity tags" in response.get_json()["message"]
    assert client.get("/customers/1").get_json() == {"id": "1", **JOE}
