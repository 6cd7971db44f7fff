"""Metrics of the real service with two workers: sums over both, kept when a worker is killed."""

import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import cluster_config
from embedded import free_port
from http_client import call
from service_process import ServiceProcess

pytestmark = pytest.mark.cluster
ROUTE = "/customers/<path:customer_id>"
STREAMED = 50_000  # customers: a list far larger than the socket buffers between us


def scrape(url: str) -> dict:
    """Return {(sample name, sorted label pairs): value} of one scrape."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def customer_gets(scraped: dict) -> float:
    """Return the count of GET /customers/<id> answered 200."""
    return scraped.get(("customers_requests_total", (("method", "GET"), ("route", ROUTE),
                                                     ("status", "200"))), 0.0)


def all_requests(scraped: dict) -> float:
    """Return the sum of customers_requests_total over every label."""
    return sum(value for (name, _), value in scraped.items() if name == "customers_requests_total")


def get_customer(url: str, times: int) -> None:
    """GET one customer `times` times, each on a new connection, from 8 threads at once."""
    def one(_):
        with urllib.request.urlopen(url + "/customers/metered", timeout=10) as response:
            assert response.status == 200
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(times)))


def workers(service) -> list:
    """Return the service's worker processes."""
    return psutil.Process(service.process.pid).children()


@pytest.fixture(scope="module")
def service(redis_cluster, tmp_path_factory):
    """The real service on the session's cluster, two workers, metrics files in a known place."""
    directory = tmp_path_factory.mktemp("metrics")
    (directory / "counter_1.db").write_bytes(b"left by an earlier run")
    port = free_port()
    # Two free ports drawn one after the other may be the same one: the exporter's must differ.
    exporter = next(other for other in iter(free_port, None) if other != port)
    env = {**redis_cluster.service_env(), "WORKERS": "2", "THREADS": "4", "PORT": str(port),
           "LOG_LEVEL": "WARNING", "PROMETHEUS_MULTIPROC_DIR": str(directory),
           "GRANIAN_METRICS_PORT": str(exporter)}
    with ServiceProcess(env) as running:
        running.granian_metrics = f"http://127.0.0.1:{env['GRANIAN_METRICS_PORT']}"
        assert call(running.url + "/customers/metered", "PUT", {"name": "Ada"})[0] == 201
        running.directory = directory
        yield running
    assert "Traceback" not in running.printed


def test_after_n_requests_over_two_workers_the_sum_grows_by_exactly_n(service):
    assert not (service.directory / "counter_1.db").exists()  # cleared at start
    before = customer_gets(scrape(service.url))
    requests = 240
    get_customer(service.url, requests)
    # Whichever worker answers a scrape, it reports the sum over both.
    for _ in range(6):
        assert customer_gets(scrape(service.url)) - before == requests
    # Both workers served some of them: each keeps its share in its own file.
    shares = []
    for path in service.directory.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
            shares += [sample.value for sample in metric.samples
                       if sample.name == "customers_requests_total"
                       and sample.labels.get("route") == ROUTE]
    assert len([share for share in shares if share > 0]) >= 2, shares


def stream_held_open(service) -> tuple[socket.socket, int]:
    """Start GET /customers, read only its first bytes; return the socket and the worker's pid."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", service.port))
    client.sendall(b"GET /customers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert client.recv(64).startswith(b"HTTP/1.1 200")
    ours = client.getsockname()
    for worker in workers(service):
        if any(connection.raddr and tuple(connection.raddr) == ours
               for connection in worker.net_connections()):
            return client, worker.pid
    raise AssertionError("no worker holds the list's connection")


def test_a_worker_killed_with_sigkill_loses_no_count_already_scraped(service, redis_cluster,
                                                                     open_database):
    # Not emptied first (as cluster_database would): the module's service keeps its customer.
    pipe = open_database(cluster_config(redis_cluster)).pipeline(transaction=False)
    for n in range(STREAMED):
        pipe.hset(f"customer:streamed{n}", mapping={"name": "Joe", "note": "x" * 100})
    pipe.execute()
    try:
        kill_a_worker_mid_list(service)
    finally:
        redis_cluster.flush()


def kill_a_worker_mid_list(service) -> None:
    """Scrape, SIGKILL the worker streaming a list, and check that nothing scraped is lost."""
    get_customer(service.url, 40)

    client, victim = stream_held_open(service)
    scraped = scrape(service.url)
    assert scraped[("customers_streamed_lists_in_progress", ())] == 1
    gets, total = customer_gets(scraped), all_requests(scraped)
    old = {worker.pid for worker in workers(service)}
    os.kill(victim, signal.SIGKILL)
    client.close()
    deadline = time.monotonic() + 30
    while len(set(worker.pid for worker in workers(service)) - old) < 1:
        assert time.monotonic() < deadline, "granian did not replace the killed worker"
        time.sleep(0.1)

    scraped = scrape(service.url)
    assert customer_gets(scraped) == gets
    assert all_requests(scraped) > total
    # The dead worker's list is no longer in progress.
    assert scraped[("customers_streamed_lists_in_progress", ())] == 0
    get_customer(service.url, 40)
    assert customer_gets(scrape(service.url)) == gets + 40
    # granian's own exporter counts the replacement.
    assert scrape(service.granian_metrics)[("granian_workers_respawns_for_err_total", ())] == 1
