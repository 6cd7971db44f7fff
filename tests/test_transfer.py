"""NDJSON: the export streams the list a line a customer; the import applies lines one by one."""

import http.client
import io
import json
import socket
import threading
import time
import uuid
from urllib.parse import quote

import psutil
import pytest
import redis
from flask import Flask

from conftest import cluster_config
from embedded import free_port
from errors import RETRY_AFTER_SECONDS
from http_client import call
from listing import walk
from local_cluster import LocalCluster
from server import create_app
from service_process import ServiceProcess
from settings import Config
from storage import CustomerStore
from test_listing import add_customers, next_link
from transfer import CUT_SHORT, MAX_LISTED_FAILURES, Import, stream

NDJSON = "application/x-ndjson"
NDJSON_IN = {"Content-Type": NDJSON}
NDJSON_OUT = {"Accept": NDJSON}
CHUNKED = {"headers": {**NDJSON_IN, "Transfer-Encoding": "chunked"},
           "environ_overrides": {"wsgi.input_terminated": True}}


def lines(*items) -> bytes:
    """Encode items (dicts, or text taken as it is) as NDJSON lines."""
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n"
                    for item in items)


def exported(client, query: str = "") -> list:
    """Return the customers of an NDJSON export, checking its framing."""
    response = client.get(f"/customers{query}", headers=NDJSON_OUT)
    assert response.status_code == 200
    assert response.mimetype == NDJSON
    assert response.data == b"" or response.data.endswith(b"\n")
    return [json.loads(line) for line in response.data.splitlines()]


def by_id(customers: list) -> dict:
    return {customer["id"]: customer for customer in customers}


def test_the_export_holds_the_customers_of_the_json_list_one_a_line(client, redis_client):
    add_customers(redis_client, 1500)
    client.put("/customers/typed", json={"n": 1, "f": 2.5, "b": False, "s": "1"})
    listed = client.get("/customers").get_json()
    assert len(listed) == 1501
    assert by_id(exported(client)) == by_id(listed)


def test_an_empty_database_exports_an_empty_body(client):
    assert exported(client) == []


@pytest.mark.parametrize(("accept", "mimetype"), [
    (None, "application/json"), ("*/*", "application/json"),
    ("application/json", "application/json"), (NDJSON, NDJSON),
    (f"application/json;q=0.5, {NDJSON}", NDJSON),
])
def test_accept_chooses_json_or_ndjson(client, accept, mimetype):
    client.put("/customers/1", json={"a": 1})
    headers = {"Accept": accept} if accept else {}
    assert client.get("/customers", headers=headers).mimetype == mimetype
    assert client.get("/customers?limit=1", headers=headers).mimetype == mimetype


def test_ndjson_pages_follow_the_same_links(client, redis_client):
    stored = add_customers(redis_client, 250)
    url, listed = "/customers?limit=100", []
    while url:
        response = client.get(url, headers=NDJSON_OUT)
        assert response.status_code == 200 and response.mimetype == NDJSON
        page = [json.loads(line) for line in response.data.splitlines()]
        assert len(page) <= 100
        listed += [customer["id"] for customer in page]
        url = next_link(response)
    assert sorted(listed) == sorted(stored)


def test_an_export_cut_short_by_the_database_ends_with_a_line_that_is_no_json():
    def batches():
        yield [{"id": "1"}]
        yield [{"id": "2"}]
        raise redis.ConnectionError("the database went away")

    app = Flask(__name__)
    app.add_url_rule("/", view_func=lambda: stream(batches()))
    body = app.test_client().get("/").data
    assert body == b'{"id":"1"}\n{"id":"2"}\n' + CUT_SHORT
    with pytest.raises(ValueError):
        json.loads(body.splitlines()[-1])


def test_an_export_imported_into_an_empty_database_reproduces_it(client, redis_client):
    originals = [
        {"id": "plain", "name": "Joe", "email": "joe@example.com"},
        {"id": "typed", "int": 42, "neg": -7, "float": 2.5, "tiny": 1e-300, "true": True,
         "false": False, "zero": 0, "text_number": "42", "text_bool": "true", "empty": ""},
        {"id": "big", "beyond_64_bits": 2**70, "negative": -(2**65)},
        {"id": "a/b c?d#é", "name": "Zoë ☃ 😀", "quote": "\"\\\n\t"},
        {"id": "many", **{f"f{n}": n for n in range(300)}},
    ]
    for customer in originals:
        fields = {name: value for name, value in customer.items() if name != "id"}
        response = client.put(f"/customers/{quote(customer['id'], safe='')}", json=fields)
        assert response.status_code == 201
    add_customers(redis_client, 300)
    before = client.get("/customers", headers=NDJSON_OUT).data
    redis_client.flushall()
    assert client.get("/customers").get_json() == []
    response = client.post("/customers", data=before, headers=NDJSON_IN)
    assert response.status_code == 200
    assert response.get_json() == {"lines": 305, "created": 305, "updated": 0, "failed": 0,
                                   "failures": [], "unlisted_failures": 0}
    after = exported(client)
    assert by_id(after) == by_id(json.loads(line) for line in before.splitlines())
    for customer in originals:
        assert by_id(after)[customer["id"]] == customer
        assert type(by_id(after)[customer["id"]].get("float", 0.0)) is float


def test_lines_with_an_id_merge_as_put_does_and_lines_without_one_are_created(client):
    client.put("/customers/old", json={"name": "Old", "drop": 1, "keep": True})
    body = lines({"id": "old", "name": "New", "drop": None},
                 {"id": "fresh", "name": "Fresh", "n": 1},
                 {"name": "No id", "n": 2.5},
                 {"name": "No id either"})
    response = client.post("/customers", data=body, headers=NDJSON_IN)
    assert response.status_code == 200
    summary = response.get_json()
    assert (summary["lines"], summary["created"], summary["updated"], summary["failed"]) == (
        4, 3, 1, 0)
    customers = by_id(client.get("/customers").get_json())
    assert customers["old"] == {"id": "old", "name": "New", "keep": True}
    assert customers["fresh"] == {"id": "fresh", "name": "Fresh", "n": 1}
    new = [customer for customer in customers.values() if customer["id"] not in ("old", "fresh")]
    assert sorted(customer["name"] for customer in new) == ["No id", "No id either"]
    for customer in new:
        assert uuid.UUID(customer["id"]).version == 4


@pytest.mark.parametrize(("line", "words"), [
    (b"not json", "the line is not valid JSON"),
    (b"[1, 2]", "the line must be a JSON object"),
    (b'"text"', "the line must be a JSON object"),
    (b'{"id": "x"}', "at least one field besides id"),
    (b"{}", "at least one field besides id"),
    (b'{"id": 7, "a": 1}', "the id must be a string"),
    (b'{"id": null, "a": 1}', "the id must be a string"),
    (b'{"id": "", "a": 1}', "the id must be a string"),
    (b'{"id": "..", "a": 1}', "the id must be a string"),
    (b'{"id": "a\\u0000b", "a": 1}', "the id must be a string"),
    (b'{"a": null}', "no field to remove"),
    (b'{"a": {"b": 1}}', "not an object"),
    (b'{"a": [1]}', "not an array"),
    (b'{"_type:a": "int"}', "reserved"),
    (b'{"": 1}', "must not be empty"),
    (b'{"a": 1, "a": 2}', 'member "a" more than once'),
    (b'{"a": 1e400}', "outside the range of a 64-bit float"),
    (b'{"a": NaN}', "the line is not valid JSON"),
    (b'{"a": "\\ud800"}', "lone surrogate"),
    (b'{"a": "\xff"}', "the line is not UTF-8 text"),
    (b'{"a": 1, "b": 2, "c": 3, "d": 4}', "at most MAX_FIELDS=3 fields"),
])
def test_a_bad_line_fails_alone_and_the_others_are_applied(redis_client, line, words):
    client = create_app(Config(max_fields=3), redis_client).test_client()
    body = lines({"id": "before", "a": 1}, line, {"id": "after", "a": 2})
    response = client.post("/customers", data=body, headers=NDJSON_IN)
    assert response.status_code == 200
    summary = response.get_json()
    assert (summary["created"], summary["failed"], summary["unlisted_failures"]) == (2, 1, 0)
    [failure] = summary["failures"]
    assert failure["line"] == 2 and words in failure["message"], failure
    assert sorted(c["id"] for c in client.get("/customers").get_json()) == ["after", "before"]


def test_another_programs_key_and_a_merge_over_max_fields_fail_their_lines_alone(redis_client):
    client = create_app(Config(max_fields=3), redis_client).test_client()
    redis_client.set("customer:text", "not a hash")
    client.put("/customers/full", json={"a": 1, "b": 2, "c": 3})
    body = lines({"id": "text", "a": 1}, {"id": "full", "d": 4}, {"id": "full", "a": None, "d": 4},
                 {"id": "ok", "a": 1})
    summary = client.post("/customers", data=body, headers=NDJSON_IN).get_json()
    assert (summary["created"], summary["updated"], summary["failed"]) == (1, 1, 2)
    assert [failure["line"] for failure in summary["failures"]] == [1, 2]
    assert "holds something that is not a customer" in summary["failures"][0]["message"]
    assert "MAX_FIELDS=3 fields; this line would leave 4" in summary["failures"][1]["message"]
    assert redis_client.get("customer:text") == "not a hash"
    assert client.get("/customers/full").get_json() == {"id": "full", "b": 2, "c": 3, "d": 4}


def test_blank_lines_are_skipped_and_line_numbers_count_every_line(client):
    body = b'\n{"id": "1", "a": 1}\r\n   \n{"id": "2"}\n{"id": "3", "a": 3}'
    summary = client.post("/customers", data=body, headers=NDJSON_IN).get_json()
    assert (summary["lines"], summary["created"], summary["failed"]) == (3, 2, 1)
    assert summary["failures"][0]["line"] == 4


def test_at_most_a_thousand_failures_are_listed_then_counted(client):
    body = b"nope\n" * (MAX_LISTED_FAILURES + 234) + lines({"id": "last", "a": 1})
    summary = client.post("/customers", data=body, headers=NDJSON_IN).get_json()
    assert summary["failed"] == MAX_LISTED_FAILURES + 234
    assert len(summary["failures"]) == MAX_LISTED_FAILURES
    assert summary["unlisted_failures"] == 234
    assert summary["failures"][-1]["line"] == MAX_LISTED_FAILURES
    assert summary["created"] == 1


def test_max_body_bytes_bounds_each_line_not_the_import(redis_client):
    client = create_app(Config(max_body_bytes=1000), redis_client).test_client()
    body = lines(*({"id": f"c{n}", "text": "x" * 50} for n in range(100)),
                 {"id": "long", "text": "x" * 2000}, {"id": "end", "a": 1})
    assert len(body) > 5000
    for options in ({"data": body, "headers": NDJSON_IN},
                    {"input_stream": io.BytesIO(body), **CHUNKED}):
        summary = client.post("/customers", **options).get_json()
        assert (summary["lines"], summary["failed"]) == (102, 1)
        assert summary["failures"] == [
            {"line": 101, "message": "the line is longer than MAX_BODY_BYTES=1000 bytes"}]
    assert len(client.get("/customers").get_json()) == 101


def test_an_import_over_max_import_bytes_is_413(redis_client):
    body = lines(*({"id": f"c{n:03d}", "text": "x" * 80} for n in range(100)))
    client = create_app(Config(max_import_bytes=len(body) - 1), redis_client).test_client()
    sized = client.post("/customers", data=body, headers=NDJSON_IN)
    assert sized.status_code == 413
    assert sized.get_json()["message"] == (f"an import is at most MAX_IMPORT_BYTES={len(body) - 1}"
                                           " bytes; nothing was applied")
    assert client.get("/customers").get_json() == []
    chunked = client.post("/customers", input_stream=io.BytesIO(body), **CHUNKED)
    assert chunked.status_code == 413
    assert "the lines after them were not" in chunked.get_json()["message"]
    at_limit = create_app(Config(max_import_bytes=len(body)), redis_client).test_client()
    response = at_limit.post("/customers", input_stream=io.BytesIO(body), **CHUNKED)
    assert response.status_code == 200 and response.get_json()["created"] + \
        response.get_json()["updated"] == 100


@pytest.mark.cluster
def test_an_import_larger_than_max_body_bytes_streams_through_the_real_service(
        empty_redis_cluster):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "THREADS": "2",
           "LOG_LEVEL": "WARNING", "MAX_BODY_BYTES": "1000", "MAX_IMPORT_BYTES": "300000"}
    body = lines(*({"id": f"c{n}", "name": f"Customer {n}", "n": n} for n in range(5000)))
    assert 100_000 < len(body) < 300_000
    with ServiceProcess(env) as service:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        # Chunked, in pieces that cut lines anywhere.
        pieces = (body[at:at + 777] for at in range(0, len(body), 777))
        connection.request("POST", "/customers", pieces, NDJSON_IN, encode_chunked=True)
        response = connection.getresponse()
        summary = json.loads(response.read())
        assert response.status == 200, summary
        assert (summary["created"], summary["failed"]) == (5000, 0)
        over = body * 2
        connection.request("POST", "/customers", (over[at:at + 4096]
                                                  for at in range(0, len(over), 4096)),
                           NDJSON_IN, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert "MAX_IMPORT_BYTES=300000" in json.loads(response.read())["message"]
        connection.close()
        status, _, customer = call(f"{service.url}/customers/c4999")
        assert (status, customer) == (200, {"id": "c4999", "name": "Customer 4999", "n": 4999})

        # One import at a time in a worker: a second, while the first's body still comes, is
        # 429 at once, and the worker serves everything else meanwhile.
        held = lines({"id": "held", "n": 1})
        first = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        first.sendall(b"POST /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n" % len(held) + held + b"\r\n")
        time.sleep(0.5)  # nothing outside the worker tells that it is reading the body
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        connection.request("POST", "/customers", lines({"id": "refused"}), NDJSON_IN)
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert (response.status, response.getheader("Retry-After")) == (429, "2"), answer
        assert answer["message"].startswith("imports run 1 at a time in each worker")
        assert call(f"{service.url}/customers/c1")[0] == 200
        first.sendall(b"0\r\n\r\n")
        reply = first.recv(4096)
        first.close()
        assert reply.startswith(b"HTTP/1.1 200") and b'"created":1' in reply, reply
        assert call(f"{service.url}/customers/refused")[0] == 404
        assert call(f"{service.url}/customers/held")[2] == {"id": "held", "n": 1}


@pytest.mark.cluster
def test_a_chunk_whose_connections_broke_is_sent_again_with_the_same_new_ids(cluster_database):
    store = CustomerStore(cluster_database, retry_seconds=5)
    tally = Import(store)
    for number in range(1, 301):
        tally.add(number, b'{"name": "Joe", "n": %d}' % number, 10000, 100)
    tally.apply()  # sent, not yet read
    pending, chunk, _ = tally.in_flight
    for _, connection, _ in pending.sent:
        connection.disconnect()
    tally.finish()
    assert (tally.created + tally.updated, tally.failed) == (300, 0)
    stored = [key for node in cluster_database.get_primaries()
              for key in cluster_database.get_redis_connection(node).scan_iter(count=1000)]
    assert sorted(stored) == sorted(f"customer:{customer_id}" for customer_id, _ in chunk)


@pytest.mark.cluster
def test_primaries_without_the_merge_script_get_it_and_apply_every_line(redis_cluster,
                                                                        cluster_database):
    for node in redis_cluster.primary_nodes():
        redis_cluster.admin(node).script_flush()
    client = create_app(Config(), cluster_database).test_client()
    body = lines(*({"id": f"c{n}", "n": n} for n in range(500)))
    summary = client.post("/customers", data=body, headers=NDJSON_IN).get_json()
    assert (summary["created"], summary["failed"]) == (500, 0)
    assert client.get("/customers/c499").get_json() == {"id": "c499", "n": 499}


@pytest.mark.cluster
def test_the_memorydb_cluster_imports_with_dbwaitreplicas_under_the_app_user(
        empty_memorydb_cluster, open_database):
    config = cluster_config(empty_memorydb_cluster, db_wait_replicas=1)
    client = create_app(config, open_database(config)).test_client()
    body = lines(*({"id": f"c{n}", "n": n, "vip": n % 2 == 0} for n in range(300)))
    summary = client.post("/customers", data=body, headers=NDJSON_IN).get_json()
    assert (summary["created"], summary["failed"]) == (300, 0)
    assert len(exported(client)) == 300
    assert by_id(exported(client, "?fields=vip"))["c2"] == {"id": "c2", "vip": True}


def test_an_import_export_or_projection_while_the_database_is_down_is_503(open_database):
    config = Config(db_host="127.0.0.1", db_port=free_port(), db_timeout=0.5,
                    db_retry_seconds=0.5)
    client = create_app(config, open_database(config)).test_client()
    body = lines(*({"id": f"c{n}", "n": n} for n in range(10)))
    response = client.post("/customers", data=body, headers=NDJSON_IN)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.get_json()["message"] == (
        "the database is unavailable; no line was applied (0 created, 0 updated, 0 failed); "
        "the next chunk of lines may be in part, the lines after it were not; try again shortly")
    assert client.get("/customers", headers=NDJSON_OUT).status_code == 503
    assert client.get("/customers/1?fields=name").status_code == 503
    assert client.get("/customers?fields=name&limit=5").status_code == 503


def resident_megabytes(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def post_lines(port: int, count: int, prefix: str) -> dict:
    """POST count generated customers as one chunked NDJSON body; return the summary."""
    def pieces():
        for first in range(0, count, 1000):
            yield b"".join(b'{"id": "%s%d", "name": "Joe", "email": "joe@example.com", '
                           b'"balance": %d}\n' % (prefix.encode(), n, n)
                           for n in range(first, min(first + 1000, count)))

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/customers", pieces(), NDJSON_IN, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.cluster
def test_a_worker_does_not_grow_with_the_size_of_an_import(empty_redis_cluster):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "THREADS": "2",
           "LOG_LEVEL": "WARNING"}
    with ServiceProcess(env) as service:
        [worker] = psutil.Process(service.process.pid).children()
        assert post_lines(service.port, 20_000, "warm")["created"] == 20_000
        before, peak, done = resident_megabytes(worker), [0.0], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], resident_megabytes(worker))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            summary = post_lines(service.port, 200_000, "big")
        finally:
            done.set()
            sampler.join()
        grown = peak[0] - before
    assert (summary["created"], summary["failed"]) == (200_000, 0)
    print(f"\nworker peaked {grown:.1f} MB above its size before, importing 200,000 customers")
    assert grown <= 20


@pytest.mark.cluster
def test_an_import_through_a_primary_failover_applies_every_line_once(tmp_path, open_database,
                                                                      redis_server_binary):
    count = 30_000
    body = b"".join(b'{"name": "Joe", "n": %d}\n' % n for n in range(count))  # new ids
    with LocalCluster(redis_server_binary, tmp_path, replicas=1) as cluster:
        # DBWAITREPLICAS=1: an acknowledged chunk is on a replica, so the failover keeps it.
        config = cluster_config(cluster, db_wait_replicas=1, db_retry_seconds=40)
        redis_client = open_database(config)
        client = create_app(config, redis_client).test_client()
        answered = {}
        importing = threading.Thread(target=lambda: answered.update(
            response=client.post("/customers", data=body, headers=NDJSON_IN)))
        importing.start()
        victim = cluster.primary_nodes()[0]
        deadline = time.monotonic() + 60
        while cluster.admin(victim).dbsize() < 1000 and importing.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert importing.is_alive(), "the import ended before the failover"
        cluster.kill(victim)
        cluster.wait_ok(60)  # its replica took over; it comes back as a replica of that one
        cluster.start_node(victim)
        importing.join(120)
        response = answered["response"]
        assert response.status_code == 200, response.get_json()
        summary = response.get_json()
        print(f"\nimport through a failover: {summary['created']} created, "
              f"{summary['updated']} updated (applied again by a retry)")
        assert (summary["created"] + summary["updated"], summary["failed"]) == (count, 0)
        stored = [customer for batch in walk(CustomerStore(redis_client, retry_seconds=30))
                  for customer in batch]
    assert len(stored) == count
    assert sorted(customer["n"] for customer in stored) == list(range(count))
