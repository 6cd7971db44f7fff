"""HTTP as RFC 9110 and RFC 5789 say: OPTIONS, 201 from PUT, If-Match on reads, PATCH's 415."""

import pytest

MERGE_PATCH = "application/merge-patch+json"


def test_options_of_the_collection_lists_its_methods(client):
    response = client.options("/customers")
    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS, POST"


def test_options_of_a_customer_lists_its_methods_and_the_patch_format(client):
    response = client.options("/customers/1")
    assert response.status_code == 204
    assert response.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, PUT"
    assert response.headers["Accept-Patch"] == MERGE_PATCH


def test_patch_in_another_format_is_415_naming_the_one_it_takes(client):
    client.put("/customers/1", json={"name": "Joe"})
    response = client.patch("/customers/1", json={"name": "Ann"})
    assert response.status_code == 415
    assert response.headers["Accept-Patch"] == MERGE_PATCH
    assert MERGE_PATCH in response.get_json()["message"]
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Joe"}


def test_get_with_an_if_match_that_fails_is_412_and_one_that_holds_is_200(client):
    client.put("/customers/1", json={"name": "Joe"})
    etag = client.get("/customers/1").headers["ETag"]
    response = client.get("/customers/1", headers={"If-Match": '"0123"'})
    assert response.status_code == 412
    assert "If-Match" in response.get_json()["message"]
    assert client.get("/customers/1", headers={"If-Match": etag}).status_code == 200
    assert client.get("/customers/1", headers={"If-Match": "*"}).status_code == 200
    # Weak tags never match If-Match (strong comparison).
    assert client.get("/customers/1", headers={"If-Match": f"W/{etag}"}).status_code == 412


def test_a_patch_with_if_match_answers_the_new_version_not_412(client):
    client.put("/customers/1", json={"name": "Joe"})
    etag = client.get("/customers/1").headers["ETag"]
    response = client.patch("/customers/1", json={"name": "Ann"},
                            headers={"Content-Type": MERGE_PATCH, "If-Match": etag})
    assert response.status_code == 200
    assert response.headers["ETag"] != etag


@pytest.mark.parametrize(("body", "words"), [
    ({f"f{n}": n for n in range(1001)}, "at most MAX_FIELDS=1000 fields; the body sets 1001"),
    ({f"f{n}": None for n in range(2001)}, "names 2001"),
])
def test_a_body_over_max_fields_is_400_naming_the_limit(client, stored_keys, body, words):
    response = client.put("/customers/1", json=body)
    assert response.status_code == 400
    assert words in response.get_json()["message"]
    assert stored_keys() == []


def test_a_merge_that_would_pass_max_fields_is_400_and_changes_nothing(client, redis_client):
    client.put("/customers/1", json={f"a{n}": n for n in range(600)})
    response = client.put("/customers/1", json={f"b{n}": n for n in range(600)})
    assert response.status_code == 400
    assert "MAX_FIELDS=1000" in response.get_json()["message"]
    assert "this write would leave 1200" in response.get_json()["message"]
    assert len(client.get("/customers/1").get_json()) == 601
    conditional = client.put("/customers/1", json={f"b{n}": n for n in range(600)},
                             headers={"If-Match": "*"})
    assert conditional.status_code == 400
    patch = client.patch("/customers/1", json={f"b{n}": n for n in range(600)},
                         headers={"Content-Type": MERGE_PATCH})
    assert patch.status_code == 400
    assert len(client.get("/customers/1").get_json()) == 601
    # Replacing fields one for one stays within the limit.
    swap = {**{f"a{n}": None for n in range(500)}, **{f"b{n}": n for n in range(500)}}
    assert client.put("/customers/1", json=swap).status_code == 204
