"""The embedded database under faults: kill -9 loses no acknowledged write; SIGTERM drains."""

import os
import signal
import threading
from pathlib import Path

import pytest
import redis

from http_client import call
from mixed_load import MixedLoad, report, wait_until
from service_process import ServiceProcess
from test_embedded import embedded_env

pytestmark = pytest.mark.cluster


def embedded_pid(data_dir: Path) -> int:
    """Return the process id of the embedded redis-server keeping data_dir."""
    port = int((data_dir / "port").read_text())
    with redis.Redis(port=port, socket_timeout=5) as client:
        return int(client.info("server")["process_id"])


def requests_read_by(port: int) -> int:
    """Count the connections to a local port whose request the server has read already."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state, queues = line.split()[1:5]
        # State 01 is ESTABLISHED; an empty receive queue means the server read the request.
        if int(local.split(":")[1], 16) == port and state == "01" and queues.endswith(":00000000"):
            count += 1
    return count


def test_kill_9_of_the_embedded_redis_under_writes_loses_no_acknowledged_write(tmp_path):
    env = {**embedded_env(tmp_path), "DBRETRYSECONDS": "0"}
    with ServiceProcess(env) as service:
        load = MixedLoad(service.url, threads=4).start()
        load.wait_for_successes(300)
        os.kill(embedded_pid(tmp_path / "data"), signal.SIGKILL)
        wait_until(lambda: any(outcome.status == "503" for outcome in load.outcomes))
        load.stop()
    assert service.process.returncode == 0
    with ServiceProcess(env) as service:
        lost = load.lost_writes(service.url)
        report("Embedded Redis killed (kill -9) under writes, service restarted", load, len(lost))
    assert lost == []
    assert len(load.acknowledged) >= 20


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
        assert call(service.url + "/customers/0", "PUT", {"n": 0})[0] == 204
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
            sender.join(60)
        exit_code = service.stop()
    assert answers == {1: 204, 2: 204, 3: 204}
    assert exit_code == 0
    assert "embedded Redis stopped (exit 0)" in service.printed
    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/3")[2] == {"id": "3", "n": 3}
