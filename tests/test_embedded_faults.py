"""The embedded database under faults: kill -9 loses no acknowledged write; SIGTERM drains."""

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from http_client import call
from mixed_load import MixedLoad, report, wait_until
from service_process import ServiceProcess
from test_embedded import embedded_client, embedded_env

pytestmark = pytest.mark.cluster


def embedded_pid(data_dir: Path) -> int:
    """Return the process id of the embedded database server keeping data_dir."""
    with embedded_client(data_dir) as client:
        return int(client.info("server")["process_id"])


def watch_health(url: str, seconds: float) -> list:
    """Poll /healthz and /readyz for seconds; return (time, healthz seconds, readyz status)s."""
    probes = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        assert call(url + "/healthz", timeout=10)[0] == 200
        took = time.monotonic() - began
        probes.append((began, took, call(url + "/readyz", timeout=10)[0]))
        time.sleep(0.05)
    return probes


def requests_read_by(port: int) -> int:
    """Count the connections to a local port whose request the server has read already."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state, queues = line.split()[1:5]
        # State 01 is ESTABLISHED; an empty receive queue means the server read the request.
        if int(local.split(":")[1], 16) == port and state == "01" and queues.endswith(":00000000"):
            count += 1
    return count


def test_kill_9_of_the_embedded_database_under_writes_restarts_it_and_loses_nothing(tmp_path):
    env = {**embedded_env(tmp_path), "DBRETRYSECONDS": "0"}
    data = tmp_path / "data"
    with ServiceProcess(env) as service:
        load = MixedLoad(service.url, threads=4).start()
        load.wait_for_successes(300)
        killed = embedded_pid(data)
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()
        probes = watch_health(service.url, seconds=6)
        load.wait_for_successes(300)
        load.stop()
        restarted = embedded_pid(data)
        lost = load.lost_writes(service.url)
        first_write = min(outcome.ended for outcome in load.outcomes if outcome.ok
                          and outcome.op in ("create", "update") and outcome.started > killed_at)
        # Back within tens of milliseconds, the server is seldom caught away by a probe: the
        # next test keeps it away to check /readyz meanwhile.
        ready_again = next(began for began, _, status in probes if status == 200)
        report("Embedded database killed (kill -9) under writes, restarted by the service",
               load, len(lost), {
                   "kill -9 to first acknowledged write": f"{first_write - killed_at:.2f} s",
                   "kill -9 to /readyz ready": f"{ready_again - killed_at:.2f} s",
                   "/readyz probes answered 503": str(sum(s == 503 for *_, s in probes)),
                   "slowest /healthz meanwhile": f"{max(took for _, took, _ in probes):.3f} s"})
    assert lost == []
    assert len(load.acknowledged) >= 20
    assert restarted != killed
    # Reaped by the service: gone, not left a zombie.
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() != "zombie"
    assert first_write - killed_at < 5
    assert ready_again - killed_at < 5
    assert max(took for _, took, _ in probes) < 0.5
    assert {status for *_, status in probes} <= {200, 503}
    assert "embedded database died (exit -9;" in service.printed
    assert service.process.returncode == 0


def test_a_kill_9_of_the_embedded_database_loses_no_write_and_fails_only_around_the_kill(tmp_path):
    # DBRETRYSECONDS (4 s by default) outlasts the restart: the plain client's errors are
    # retried, and the reads and writes in flight wait for the new server instead of failing.
    with ServiceProcess(embedded_env(tmp_path)) as service:
        load = MixedLoad(service.url, threads=4).start()
        load.wait_for_successes(200)
        killed = embedded_pid(tmp_path / "data")
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: "embedded database back after" in service.output(), 10)
        load.wait_for_successes(200)
        load.stop()
        lost = load.lost_writes(service.url)
        in_flight = sum(outcome.started < killed_at < outcome.ended for outcome in load.outcomes)
        report("Embedded database killed (kill -9) under writes, DBRETRYSECONDS=4", load,
               len(lost), {"requests in flight at the kill": str(in_flight)})
    assert lost == []
    assert in_flight >= 1
    # Retries wait for the new server, but only THREADS/2 threads a worker may wait at once
    # (database.waiting_threads): the others answer 503 at once, and only around the kill.
    failed = [outcome for outcome in load.outcomes if not outcome.ok]
    assert {outcome.status for outcome in failed} <= {"503"}
    assert all(killed_at - 1 < outcome.started < killed_at + 5 for outcome in failed)
    assert "embedded database died (exit -9;" in service.printed


def test_while_the_embedded_database_cannot_start_again_readyz_is_503_until_it_can(tmp_path):
    data = tmp_path / "data"
    with ServiceProcess({**embedded_env(tmp_path), "DBRETRYSECONDS": "0"}) as service:
        assert call(service.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
        config = (data / "redis.conf").read_text()
        # The supervisor starts the server from this file: broken, every start fails.
        (data / "redis.conf").write_text(config + "no-such-setting yes\n")
        try:
            killed = embedded_pid(data)
            os.kill(killed, signal.SIGKILL)
            wait_until(lambda: service.output().count("did not start again") >= 2, 20)
            probes = watch_health(service.url, seconds=1)
            assert {status for *_, status in probes} == {503}
            assert max(took for _, took, _ in probes) < 0.5
            assert call(service.url + "/customers/2", "PUT", {"name": "Ann"})[0] == 503
            # Every failed start is reaped: a server that just exited waits at most the
            # supervisor's next look (50 ms) as a zombie, none stays one.
            children = psutil.Process(service.process.pid).children(recursive=True)
            zombies = [child for child in children if child.status() == "zombie"]
            time.sleep(0.5)
            assert [child.pid for child in zombies if child.is_running()] == []
        finally:
            (data / "redis.conf").write_text(config)
        repaired = time.monotonic()
        wait_until(lambda: call(service.url + "/readyz")[0] == 200, 15)
        back = time.monotonic() - repaired
        assert call(service.url + "/customers/1")[2] == {"id": "1", "name": "Joe"}
    print(f"\nrepaired to /readyz ready: {back:.2f} s")
    # Started again after 0.5, 1, 2, then every 5 s: repaired, it is back by the next start.
    assert back < 5 + 1
    assert "embedded database back after" in service.printed


def test_sigterm_lets_requests_in_flight_finish_then_exits_0_and_stops_redis(tmp_path):
    env = {**embedded_env(tmp_path), "THREADS": "4", "DBTIMEOUT": "30", "DBRETRYSECONDS": "0"}
    service = ServiceProcess(env).start()
    answers = {}

    def put(n):
        try:
            answers[n] = call(f"{service.url}/customers/{n}", "PUT", {"n": n}, timeout=60)[0]
        except OSError as error:
            answers[n] = repr(error)
    senders = [threading.Thread(target=put, args=(n,)) for n in (1, 2, 3)]
    database = embedded_pid(tmp_path / "data")
    try:
        assert call(service.url + "/customers/0", "PUT", {"n": 0})[0] == 201
        os.kill(database, signal.SIGSTOP)
        for sender in senders:
            sender.start()
        wait_until(lambda: requests_read_by(service.port) >= 3, timeout=20)
        service.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "Shutting down granian" in service.output(), timeout=20)
        assert service.process.poll() is None
    finally:
        os.kill(database, signal.SIGCONT)
        for sender in senders:
            if sender.ident is not None:  # started
                sender.join(60)
        exit_code = service.stop()
    assert answers == {1: 201, 2: 201, 3: 201}
    assert exit_code == 0
    assert "embedded database stopped (exit 0)" in service.printed
    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/3")[2] == {"id": "3", "n": 3}
