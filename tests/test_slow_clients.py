"""Slow readers, slow uploaders and idle connections do not take the service away from others."""

import http.client
import json
import os
import socket
import time
from contextlib import closing

import pytest

from conftest import cluster_config
from connection_watch import RATE_WINDOW_SECONDS, SWEEP_SECONDS
from database import connect
from deadlines import BODY_GRACE_SECONDS
from http_client import read_until_closed
from service_process import ServiceProcess
from slow_attack import attack_process, percentile, probe

pytestmark = pytest.mark.cluster
CUSTOMERS = 50_000
PROBE_ID = "probe"
IDLE_SECONDS = 3


@pytest.fixture(scope="module")
def many_customers(redis_cluster):
    """The real cluster holding CUSTOMERS customers and the probe's."""
    redis_cluster.flush()
    # By hand: the function-scoped cluster_database cannot serve a module's fixture.
    with closing(connect(cluster_config(redis_cluster))) as client:
        pipeline = client.pipeline()
        for number in range(CUSTOMERS):
            pipeline.hset(f"customer:c{number:06d}",
                          mapping={"name": f"Customer {number}",
                                   "email": f"c{number}@example.com",
                                   "city": "Lisbon", "plan": "standard"})
            if number % 5000 == 4999:
                pipeline.execute()
        pipeline.execute()
        client.hset(f"customer:{PROBE_ID}", mapping={"name": "Probe"})
    yield redis_cluster
    redis_cluster.flush()


@pytest.fixture(scope="module")
def service(many_customers):
    """The real service over those customers, closing idle connections after IDLE_SECONDS."""
    env = {**many_customers.service_env(), "WORKERS": "2", "THREADS": "4",
           "IDLE_TIMEOUT": str(IDLE_SECONDS)}
    with ServiceProcess(env) as running:
        yield running


def wait_for_log(service, text: str, timeout: float) -> float:
    """Wait until the service has logged text; return the seconds it took."""
    started = time.monotonic()
    while text not in service.output():
        assert time.monotonic() - started < timeout, f"not logged within {timeout} s: {text}"
        time.sleep(0.1)
    return time.monotonic() - started


def attacked_probes(service) -> tuple[int, list, dict]:
    """Probe for 30 s under the attack; return the tries, the successes' durations and the
    attackers replaced after a cut."""
    attack = attack_process(service.port, readers=12, uploaders=12, idle=1100, seconds=34)
    try:
        time.sleep(3)  # the attack settles: buffers fill, every thread taken that can be
        tries, durations = probe(service.port, f"/customers/{PROBE_ID}", seconds=30, timeout=2)
        replaced = attack.communicate(timeout=30)[0].strip()
    finally:
        attack.kill()
        attack.wait()
    return tries, durations, json.loads(replaced)


def test_probe_holds_under_slow_and_idle_clients(many_customers):
    """12 slow readers, 12 slow uploaders and 1,100 idle connections: probes still succeed."""
    env = {**many_customers.service_env(), "WORKERS": "2", "THREADS": "4"}
    with ServiceProcess(env) as service:
        for _ in range(2):
            tries, durations, cut = attacked_probes(service)
            worst = percentile(durations, 0.99) if durations else float("inf")
            load = os.getloadavg()[0]
            print(f"\nprobes: {len(durations)}/{tries} succeeded, p99 {worst * 1000:.0f} ms; "
                  f"attackers replaced after a cut: {cut}; load average {load:.1f}")
            # The service itself uses a few percent of a core under this attack: a p99 over
            # the bound on a machine loaded by other jobs is measured once more, not excused.
            if (len(durations) >= 0.99 * tries and worst < 0.250) or load < 2 * os.cpu_count():
                break
    assert len(durations) >= 0.99 * tries
    assert worst < 0.250
    # Under the default deadlines every slow reader and uploader was cut off at least once.
    assert cut["reader"] >= 12 and cut["uploader"] >= 12


def test_a_client_that_never_reads_a_list_is_cut_off(service):
    """A list nobody reads: the connection is reset within the rate window, the thread freed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", service.port))
    port = sock.getsockname()[1]
    sock.sendall(f"GET /customers HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n\r\n".encode())
    took = wait_for_log(service, f"closed the connection of 127.0.0.1:{port}:", 20)
    assert took <= RATE_WINDOW_SECONDS + 3 * SWEEP_SECONDS + 2
    # The thread sending it left granian's send: the response's iterator was closed.
    wait_for_log(service, "stopped GET /customers after", 5)
    sock.settimeout(5)
    received = read_until_closed(sock, ConnectionResetError)
    sock.close()
    assert not received.rstrip().endswith(b"]")  # never passes for a whole list


def test_a_slow_upload_is_answered_408_and_stores_nothing(service):
    """A PUT body at 100 bytes a second is refused with 408 after the grace, and logged."""
    body = b'{"name": "' + b"x" * 1988 + b'"}'
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.sendall(f"PUT /customers/slow-upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    sock.setblocking(False)
    started, answer = time.monotonic(), b""
    for start in range(0, len(body), 10):
        try:
            answer = sock.recv(4096)
            break
        except BlockingIOError:
            sock.send(body[start:start + 10])
            time.sleep(0.1)
    took = time.monotonic() - started
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), service.output()[-3000:]
    assert b'"message"' in answer
    assert took < BODY_GRACE_SECONDS + 2
    wait_for_log(service, "cut off PUT /customers/slow-upload", 2)
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
    connection.request("GET", "/customers/slow-upload")
    status = connection.getresponse().status
    connection.close()
    assert status == 404


def test_a_silent_upload_and_an_idle_connection_are_closed(service):
    """Headers promising a body that never comes, and a connection sending nothing: closed."""
    silent = socket.create_connection(("127.0.0.1", service.port))
    silent.sendall(b"PUT /customers/silent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                   b"application/json\r\nContent-Length: 100\r\n\r\n")
    idle = socket.create_connection(("127.0.0.1", service.port))
    started = time.monotonic()
    for sock in (silent, idle):
        sock.settimeout(IDLE_SECONDS + 3 * SWEEP_SECONDS + 2)
        try:
            assert sock.recv(4096) == b""
        except ConnectionResetError:
            pass
        sock.close()
    assert time.monotonic() - started <= IDLE_SECONDS + 3 * SWEEP_SECONDS + 2
    wait_for_log(service, "no byte moved for", 2)


@pytest.mark.parametrize(("size", "status"), [(500, b"201"), (1024 * 1024 + 1, b"413")])
def test_a_chunked_body_is_read_whole_and_over_the_limit_refused(service, size, status):
    """A chunked body, read before the app runs, counts against MAX_BODY_BYTES as any other."""
    body = b'{"name": "' + b"x" * (size - 12) + b'"}'
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"PUT /customers/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 " + status)


def test_a_list_read_past_send_timeout_is_cut_off_unclosed(many_customers):
    """A client reading steadily but too long for SEND_TIMEOUT gets a list that is not whole."""
    env = {**many_customers.service_env(), "WORKERS": "1", "SEND_TIMEOUT": "1",
           "MIN_SEND_RATE": "0"}
    with ServiceProcess(env) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(b"GET /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            started, received = time.monotonic(), b""
            while chunk := sock.recv(32 * 1024):  # at most 640 KB a second
                received += chunk
                time.sleep(0.05)
            took = time.monotonic() - started
        wait_for_log(service, "(SEND_TIMEOUT 1.0 s)", 5)
    assert took < 10
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"id":"c' in received
    assert not received.rstrip().endswith(b"]")
