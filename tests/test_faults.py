"""Faults under a steady mixed load: no 5xx but 503, and no acknowledged write lost."""

import shutil
import signal
import subprocess
import time

import pytest
from redis.crc import key_slot

from http_client import call
from local_cluster import LocalCluster
from mixed_load import MixedLoad, report, wait_until
from service_process import ServiceProcess

pytestmark = pytest.mark.cluster
RETRY_SECONDS, TIMEOUT = 5, 1
SERVICE = {"WORKERS": "1", "THREADS": "8", "DBTIMEOUT": str(TIMEOUT),
           "DBRETRYSECONDS": str(RETRY_SECONDS)}
# The longest a request may take: the retry deadline, its last attempt, and a topology refresh.
PATIENCE = RETRY_SECONDS + 3 * TIMEOUT + 2


@pytest.fixture
def clusters(tmp_path):
    """Start clusters for one test (LocalCluster's arguments), stopped at its end."""
    started = []

    def start(binary, **options):
        cluster = LocalCluster(binary, tmp_path / str(len(started)), **options)
        started.append(cluster)
        return cluster.start()
    yield start
    for cluster in started:
        cluster.stop()


def check(fault, load, service, **notes):
    """Report the fault's figures and check that no acknowledged write was lost."""
    lost = load.lost_writes(service.url)
    report(fault, load, len(lost), {name.replace("_", " "): value for name, value in notes.items()})
    assert lost == []
    assert load.acknowledged
    # A list streaming while its shard fails over for longer than DBRETRYSECONDS is cut off
    # (its JSON array left unclosed); anything else but a 503 is a failure here.
    assert set(load.errors_by_status()) <= {"503", "cut-off list"}


def test_a_killed_primary_fails_over_and_loses_no_acknowledged_write(
        clusters, tls_redis_server_binary):
    cluster = clusters(tls_redis_server_binary, replicas=1, tls=True, acl=True)
    victim, promoted = cluster.nodes[0], cluster.nodes[3]  # a primary and its replica
    with ServiceProcess({**cluster.service_env(), **SERVICE, "DBWAITREPLICAS": "1"}) as service:
        load = MixedLoad(service.url, threads=6).start()
        load.wait_for_successes(150)
        promoted_after, failover_seconds = cluster.fail_over(victim, promoted)
        load.wait_for_successes(150)
        load.stop()
        check("Primary killed (kill -9), DBWAITREPLICAS=1", load, service,
              replica_promoted_after=f"{promoted_after:.1f} s",
              old_primary_back_as_replica_after=f"{failover_seconds:.1f} s")
    assert load.longest_unavailability() < failover_seconds + PATIENCE
    assert load.slowest() < PATIENCE


@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_online_resharding_under_load_answers_every_request(memorydb_cluster):
    source, target = memorydb_cluster.primary_nodes()[:2]
    ids = {node.port: memorydb_cluster.admin(node).execute_command("CLUSTER MYID")
           for node in (source, target)}
    security = memorydb_cluster.security
    command = [shutil.which("redis-cli"), "--tls", "--cacert", str(security.ca_file),
               "--user", "admin", "--pass", security.admin_password, "--no-auth-warning",
               "--cluster", "reshard", f"127.0.0.1:{source.port}",
               "--cluster-from", ids[source.port], "--cluster-to", ids[target.port],
               "--cluster-slots", "2000", "--cluster-pipeline", "10", "--cluster-yes"]
    resharded = False
    try:
        with ServiceProcess({**memorydb_cluster.service_env(), **SERVICE}) as service:
            load = MixedLoad(service.url, threads=6).start()
            load.wait_for_successes(300)
            result = subprocess.run(command, capture_output=True, text=True, timeout=240)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            resharded = True
            load.wait_for_successes(150)
            load.stop()
            check("Online resharding (2,000 slots moved)", load, service)
    finally:
        if not resharded:  # slots left half-moved: settle them for the session's later tests
            subprocess.run([*command[:command.index("reshard")], "fix",
                            f"127.0.0.1:{source.port}", "--cluster-yes"],
                           capture_output=True, timeout=120)
        memorydb_cluster.wait_ok()
    assert load.errors_by_status() == {}
    assert "Traceback" not in service.printed


def test_the_whole_cluster_down_is_quick_503s_then_recovers_without_a_restart(
        clusters, tls_redis_server_binary):
    cluster = clusters(tls_redis_server_binary, replicas=1, tls=True, acl=True)
    with ServiceProcess({**cluster.service_env(), **SERVICE}) as service:
        load = MixedLoad(service.url, threads=6).start()
        load.wait_for_successes(150)
        killed = time.monotonic()
        for node in cluster.nodes:
            cluster.kill(node)
        status, _, body = call(service.url + "/readyz", timeout=PATIENCE)
        assert status == 503
        assert "database unreachable" in body["message"]
        wait_until(lambda: sum(outcome.status == "503" for outcome in load.outcomes) >= 12)
        for node in cluster.nodes:
            cluster.start_node(node)
        cluster.wait_ok()
        down_seconds = time.monotonic() - killed
        load.wait_for_successes(150)
        load.stop()
        assert call(service.url + "/readyz")[0] == 200
        check("Whole cluster down (every node kill -9) and back", load, service,
              cluster_down_for=f"{down_seconds:.1f} s")
    assert load.slowest() < PATIENCE


def test_a_paused_node_gives_fast_503s_and_leaves_threads_for_other_requests(
        clusters, redis_server_binary):
    cluster = clusters(redis_server_binary, config={"cluster-node-timeout": 30000})
    paused = cluster.nodes[0]  # it owns the first third of the slots
    elsewhere = next(str(n) for n in range(1000) if key_slot(f"customer:{n}".encode()) > 6000)
    env = {**cluster.service_env(), **SERVICE, "DBRETRYSECONDS": "2"}
    patience = 2 + 3 * TIMEOUT + 2
    with ServiceProcess(env) as service:
        assert call(f"{service.url}/customers/{elsewhere}", "PUT", {"v": 1})[0] == 201
        load = MixedLoad(service.url, threads=8).start()
        load.wait_for_successes(150)
        cluster.kill(paused, signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            wait_until(lambda: sum(outcome.status == "503" for outcome in load.outcomes) >= 8)
            assert call(service.url + "/healthz", timeout=patience)[0] == 200
            assert call(f"{service.url}/customers/{elsewhere}", timeout=patience)[0] == 200
        finally:
            cluster.kill(paused, signal.SIGCONT)
        paused_seconds = time.monotonic() - paused_at
        load.wait_for_successes(150)
        load.stop()
        check("Slow database (one primary paused with SIGSTOP)", load, service,
              primary_paused_for=f"{paused_seconds:.1f} s",
              slowest_request=f"{load.slowest():.1f} s (DBRETRYSECONDS=2, DBTIMEOUT=1)")
    slow = max(load.outcomes, key=lambda o: o.ended - o.started)
    assert load.slowest() < patience, slow
