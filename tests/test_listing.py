"""Listing: pages that walk every primary behind a Link header, and the streamed whole list."""

import base64
import json
import re
import threading
import time
from collections import Counter

import pytest
import redis
from flask import Flask

from bulk import Batch, PipelineBatch
from conftest import cluster_config
from database import primary_of
from listing import encode_cursor, fetch, topology, walk
from local_cluster import LocalCluster
from server import create_app, cursor_key, stream_json_array
from settings import Config
from storage import CustomerStore


def add_customers(redis_client, count, prefix="c"):
    """Store count customers straight in the database and return their ids."""
    ids = [f"{prefix}{n}" for n in range(count)]
    pipe = redis_client.pipeline(transaction=False)
    for n, customer_id in enumerate(ids):
        pipe.hset(f"customer:{customer_id}", mapping={"name": f"Customer {n}", "n": str(n)})
    pipe.execute()
    return set(ids)


def next_link(response):
    """Return the URL of the Link header's rel="next", or None."""
    match = re.fullmatch(r'<([^>]+)>; rel="next"', response.headers.get("Link", ""))
    return match and match.group(1)


def walk_pages(client, limit, during_each_page=None):
    """Follow the Link headers from the first page to the last and return every id listed."""
    ids, url = [], f"/customers?limit={limit}"
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        assert len(page) <= limit
        ids += [customer["id"] for customer in page]
        url = next_link(response)
        if during_each_page:
            during_each_page()
    return ids


@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_paging_returns_every_customer_exactly_once(client, redis_client, limit):
    stored = add_customers(redis_client, {1: 60, 7: 300}.get(limit, 1234))
    listed = walk_pages(client, limit)
    assert len(listed) == len(stored)
    assert set(listed) == stored


def test_a_page_holds_whole_customers_and_the_last_page_has_no_link(client, redis_client):
    client.put("/customers/1", json={"name": "Joe", "balance": 10, "vip": True})
    response = client.get("/customers?limit=5")
    assert response.status_code == 200
    assert response.get_json() == [{"id": "1", "name": "Joe", "balance": 10, "vip": True}]
    assert "Link" not in response.headers


def test_the_next_link_keeps_the_limit_and_carries_an_opaque_cursor(client, redis_client):
    add_customers(redis_client, 30)
    url = next_link(client.get("/customers?limit=10"))
    assert re.fullmatch(r"/customers\?limit=10&cursor=[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", url)


def test_a_cursor_without_a_limit_gets_pages_of_the_default_size(client, redis_client):
    add_customers(redis_client, 150)
    url = next_link(client.get("/customers?limit=1"))
    cursor = url.split("cursor=")[1]
    assert len(client.get(f"/customers?cursor={cursor}").get_json()) == 100


def test_streaming_returns_the_same_customers_as_paging(client, redis_client):
    add_customers(redis_client, 2100)
    streamed = client.get("/customers")
    assert streamed.status_code == 200
    assert streamed.is_streamed
    listed = [customer["id"] for customer in streamed.get_json()]
    assert len(listed) == len(set(listed)) == 2100
    assert set(listed) == set(walk_pages(client, 250))


@pytest.mark.cluster
@pytest.mark.parametrize("batch", [pytest.param(Batch, marks=pytest.mark.fast_reader),
                                   PipelineBatch])
def test_fetch_follows_a_moved_key_and_skips_keys_gone_or_retyped(cluster_database, batch):
    redis_client = cluster_database
    redis_client.hset("customer:a", mapping={"name": "A", "n": "1", "_type:n": "int"})
    redis_client.set("customer:text", "not a hash")
    home, other = primary_of(redis_client, "customer:a"), primary_of(redis_client, "customer:b")
    if other.connection_pool is home.connection_pool:
        other = primary_of(redis_client, "customer:c")
    assert other.connection_pool is not home.connection_pool
    customer = {"id": "a", "name": "A", "n": 1}
    assert fetch(redis_client, other, ["customer:a"], batch) == [customer]
    text_home = primary_of(redis_client, "customer:text")
    assert fetch(redis_client, text_home, ["customer:text", "customer:gone"], batch) == []
    assert fetch(redis_client, home, ["customer:a"], batch) == [customer]
    # The connection the batch used is back in the pool, and serves the next command.
    assert home.hgetall("customer:a") == {"name": "A", "n": "1", "_type:n": "int"}


@pytest.mark.cluster
def test_a_walk_abandoned_midway_gives_its_connections_back(empty_redis_cluster, open_database):
    redis_client = open_database(cluster_config(empty_redis_cluster), max_connections=2)
    stored = add_customers(redis_client, 3000)
    store = CustomerStore(redis_client)
    for _ in range(5):
        batches = walk(store)
        next(batches)
        batches.close()
    assert {customer["id"] for batch in walk(store) for customer in batch} == stored


def signed(position: list, config: Config | None = None) -> str:
    """Return a cursor for position, signed as the service of config (default: Config()) signs."""
    return encode_cursor(position, cursor_key(config or Config()))


def altered(token: str) -> str:
    """Return a cursor whose position says SCAN cursor 8 where it said 7, signature kept."""
    text, signature = token.split(".")
    position = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).replace(b",7,", b",8,")
    return base64.urlsafe_b64encode(position).decode().rstrip("=") + "." + signature


NESTED = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", "limit=abc", "limit=1001", "limit=1e3", "limit=", "limit=%EF%BC%95",
    "cursor=", "cursor=nonsense", "cursor=%00%01", "limit=5&cursor=bm90IGpzb24",
    "cursor=a.b.c", "cursor=" + "A" * 5000,
    # Unsigned: a client's own JSON, however deep or large its numbers.
    "cursor=" + base64.urlsafe_b64encode(b'[2,"single",0,18446744073709551616,[]]').decode(),
    "cursor=" + base64.urlsafe_b64encode(NESTED.encode()).decode(),
    "cursor=" + base64.urlsafe_b64encode(b'{"a": 1}').decode() + ".AAAA",
    # Signed by another deployment (another database password).
    "cursor=" + signed(["single", 0, 7, []], Config(db_password="another")),
    # Signed here but altered on the way: one character of the position.
    "cursor=" + altered(signed(["single", 0, 7, []])),
])
def test_a_bad_limit_or_a_cursor_this_deployment_did_not_issue_is_400(client, redis_client, query):
    add_customers(redis_client, 3)
    response = client.get(f"/customers?{query}")
    assert response.status_code == 400
    assert response.content_type == "application/json"
    assert re.search("limit must be|cursor", response.get_json()["message"])


def test_a_cursor_from_another_node_layout_is_stale_410(client, redis_client):
    add_customers(redis_client, 3)
    response = client.get(f"/customers?limit=2&cursor={signed(['000000000000', 0, 0, []])}")
    assert response.status_code == 410
    assert "start again without a cursor" in response.get_json()["message"]


def churn(client, stop: threading.Event, writer: int, per_second: float, counts: list):
    """Create (POST, and PUT of new ids) and delete customers at about per_second writes."""
    mine, started = [], time.monotonic()
    for n in range(100_000):
        if stop.is_set() or time.monotonic() - started > 60:
            return
        if n % 3 == 0:
            mine.append(client.post("/customers", json={"n": n}).get_json()["id"])
        elif n % 3 == 1:
            mine.append(f"w{writer}-{n}")
            client.put(f"/customers/{mine[-1]}", json={"n": n})
        else:
            client.delete(f"/customers/{mine.pop(0)}")
        counts[writer] += 1
        time.sleep(max(0.0, started + (n + 1) / per_second - time.monotonic()))


@pytest.mark.cluster
@pytest.mark.parametrize("writers", [0, 3])
def test_paging_while_others_write_returns_each_lasting_customer_once_or_twice(
        redis_cluster, cluster_database, writers):
    app = create_app(cluster_config(redis_cluster), cluster_database)
    lasting = add_customers(cluster_database, 5000, prefix="lasting")
    stop, counts = threading.Event(), [0] * writers
    threads = [threading.Thread(target=churn, args=(app.test_client(), stop, n, 150, counts))
               for n in range(writers)]
    for thread in threads:
        thread.start()
    pages = []
    try:
        time.sleep(0.5 if writers else 0)
        # A client that takes its time between pages: the writers get ahead of it.
        listed = walk_pages(app.test_client(), 100, lambda: pages.append(time.sleep(0.02)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    live = len(app.test_client().get("/customers").get_json())
    times = Counter(listed)
    assert lasting <= set(times)
    assert max(times.values()) <= (2 if writers else 1)
    assert len(pages) <= 1.1 * live / 100 + 5, (len(pages), live)
    if writers:
        print(f"\n{sum(counts)} writes during the walk; {len(listed)} rows for {live} "
              f"customers; {len(pages)} pages; most repeats {max(times.values())}")
        assert sum(counts) >= 300  # the writers really wrote during the walk


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory, redis_server_binary):
    """A 3-primary cluster with a replica each, so a primary can be killed and replaced."""
    with LocalCluster(redis_server_binary, tmp_path_factory.mktemp("failover"),
                      replicas=1) as cluster:
        yield cluster


def node_of(cluster, plain_client):
    """Return the LocalCluster node behind a plain client of one primary."""
    port = plain_client.connection_pool.connection_kwargs["port"]
    return next(node for node in cluster.nodes if node.port == port)


@pytest.mark.cluster
def test_a_cursor_from_before_a_failover_is_410_never_500(failover_cluster, open_database):
    failover_cluster.flush()
    redis_client = open_database(cluster_config(failover_cluster))
    client = create_app(cluster_config(failover_cluster), redis_client).test_client()
    add_customers(redis_client, 200)
    first = client.get("/customers?limit=10")
    url = next_link(first)
    killed = node_of(failover_cluster, topology(redis_client)[1][0])
    failover_cluster.kill(killed)
    try:
        statuses = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = client.get(url)
            statuses.append(response.status_code)
            if response.status_code != 503:
                break
            time.sleep(0.2)
        # 503 while the replica takes over, then 410: never 500, never a page from the wrong
        # node.
        assert set(statuses[:-1]) <= {503} and statuses[-1] == 410, statuses
        assert "start again without a cursor" in response.get_json()["message"]
        # A new listing works once the cluster has settled: 503s on the way, never a 500.
        statuses = []
        while time.monotonic() < deadline + 30:
            statuses.append(client.get("/customers?limit=1000").status_code)
            if statuses[-1] != 503:
                break
            time.sleep(0.2)
        assert set(statuses[:-1]) <= {503} and statuses[-1] == 200, statuses
    finally:
        failover_cluster.start_node(killed)
        failover_cluster.wait_ok()


@pytest.mark.cluster
@pytest.mark.parametrize("fast_reader", [pytest.param(True, marks=pytest.mark.fast_reader), False],
                         ids=["Batch", "PipelineBatch"])
def test_a_walk_interrupted_by_a_failover_resumes_without_duplicates(failover_cluster,
                                                                    open_database, fast_reader):
    failover_cluster.wait_ok()
    failover_cluster.flush()
    redis_client = open_database(cluster_config(failover_cluster))
    stored = add_customers(redis_client, 9000)
    primaries = topology(redis_client)[1]
    deadline = time.monotonic() + 30
    for primary in primaries:
        # WAIT shorter than the socket timeout, again until the replica (maybe resyncing) acks.
        while primary.wait(1, 500) != 1:
            assert time.monotonic() < deadline, "a replica did not catch up"
    # A failover here takes longer than the default DBRETRYSECONDS: give the walk time.
    batches = walk(CustomerStore(redis_client, retry_seconds=30, fast_reader=fast_reader))
    listed = [customer["id"] for customer in next(batches)]
    killed = node_of(failover_cluster, primaries[0])
    failover_cluster.kill(killed)
    try:
        listed += [customer["id"] for batch in batches for customer in batch]
    finally:
        failover_cluster.start_node(killed)
        failover_cluster.wait_ok()
    assert len(listed) == len(set(listed))
    assert set(listed) == stored


def test_streaming_keeps_integers_beyond_64_bits(client):
    client.put("/customers/1", json={"big": 10**30, "small": -(2**70)})
    assert client.get("/customers").get_json() == [{"id": "1", "big": 10**30, "small": -(2**70)}]


def test_a_put_of_thousands_of_fields_sets_and_removes_them_all(client):
    fields = {f"f{n}": n for n in range(1000)}
    assert client.put("/customers/1", json=fields).status_code == 201
    removed = {name: None for name in fields}
    assert client.put("/customers/1", json=removed | {"x": 1}).status_code == 204
    assert client.get("/customers/1").get_json() == {"id": "1", "x": 1}
    assert client.get("/customers?limit=5").get_json() == [{"id": "1", "x": 1}]


def test_a_list_cut_short_by_the_database_ends_with_its_array_unclosed():
    def batches():
        yield [{"id": "1"}]
        yield [{"id": "2"}, {"id": "3"}]
        raise redis.ConnectionError("the database went away")

    app = Flask(__name__)
    app.add_url_rule("/", view_func=lambda: stream_json_array(batches()))
    response = app.test_client().get("/")
    assert response.status_code == 200
    assert response.data == b'[{"id":"1"},{"id":"2"},{"id":"3"}'
    with pytest.raises(ValueError):
        json.loads(response.data)


def test_paging_customers_with_long_ids_keeps_every_link_short(client, redis_client):
    ids = {f"{n:04d}" + "é" * 1000 for n in range(60)}
    for customer_id in ids:
        redis_client.hset(f"customer:{customer_id}", "n", "1")
    url, listed = "/customers?limit=7", []
    while url:
        assert len(url) <= 4200
        response = client.get(url)
        assert response.status_code == 200
        listed += [customer["id"] for customer in response.get_json()]
        url = next_link(response)
    assert sorted(listed) == sorted(ids)
