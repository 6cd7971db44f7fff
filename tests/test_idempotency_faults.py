"""Idempotent creates while a primary is killed: exactly one customer per Idempotency-Key."""

import collections
import os
import threading
import time

import pytest

from http_client import call
from local_cluster import LocalCluster
from mixed_load import wait_until
from service_process import ServiceProcess

pytestmark = pytest.mark.cluster
SERVICE = {"WORKERS": "1", "THREADS": "8", "DBTIMEOUT": "1", "DBRETRYSECONDS": "5",
           "DBWAITREPLICAS": "1"}
# Shorter than the service's retries: clients give up on creates still under way, and retry.
CLIENT_TIMEOUT = 3
RETRIED = ("409", "503", "timeout", "ConnectionResetError", "ConnectionRefusedError",
           "RemoteDisconnected", "URLError")


class KeyedCreates:
    """Threads creating customers, a new Idempotency-Key each, every one sent until it is 201."""

    def __init__(self, url: str, threads: int = 6, max_keys: int = 3000,
                 max_seconds: float = 120.0, key_seconds: float = 60.0):
        self.url, self.threads, self.max_keys = url, threads, max_keys
        self.max_seconds, self.key_seconds = max_seconds, key_seconds
        self.created = {}  # key -> id of its 201
        self.unresolved = []  # keys still without a 201 after key_seconds
        self.answers = collections.Counter()
        self.retried = 0  # keys whose 201 came after an attempt without one
        self.replayed = 0  # of those, keys whose 201 was a replay: an attempt was applied
        self.failures = []  # (started, ended) of each answer other than 201
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]

    def start(self) -> "KeyedCreates":
        """Start the threads."""
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        """Stop the threads once their current key has its 201 (or its time is up)."""
        self._stop.set()
        for worker in self._workers:
            worker.join(self.key_seconds + CLIENT_TIMEOUT + 5)

    def wait_for_created(self, count: int, timeout: float = 60.0) -> None:
        """Wait until count more keys than now have their customer."""
        target = len(self.created) + count
        wait_until(lambda: len(self.created) >= target, timeout)

    def _run(self, thread: int):
        started = time.monotonic()
        for number in range(self.max_keys // self.threads):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                return
            key = f"fault-{thread}-{number}"
            self._resolve(key, {"key": key, "n": number})

    def _resolve(self, key: str, body: dict) -> None:
        deadline, attempts = time.monotonic() + self.key_seconds, 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                status, headers, reply = call(self.url + "/customers", "POST", body,
                                        timeout=CLIENT_TIMEOUT,
                                        headers={"Idempotency-Key": key})
                status = str(status)
            except OSError as error:
                status = "timeout" if "timed out" in str(error) else type(error).__name__
            with self._lock:
                self.answers[status] += 1
                if status != "201":
                    self.failures.append((began, time.monotonic()))
            if status == "201":
                with self._lock:
                    self.created[key] = reply["id"]
                    if attempts:
                        self.retried += 1
                        self.replayed += headers.get("Idempotent-Replayed") == "true"
                return
            attempts += 1
            if status not in RETRIED:
                break
            time.sleep(0.2)
        with self._lock:
            self.unresolved.append((key, status))

    def longest_unavailability(self, gap: float = 1.0) -> float:
        """Return the longest stretch of answers other than 201, in seconds."""
        longest, start, end = 0.0, None, None
        for began, ended in sorted(self.failures):
            if start is None or began > end + gap:
                start, end = began, ended
            end = max(end, ended)
            longest = max(longest, end - start)
        return longest


def report(rows: dict) -> None:
    """Print the fault's table, and append it to the file RELIABILITY_REPORT names, if set."""
    lines = ["### Idempotent creates, primary killed (kill -9), DBWAITREPLICAS=1", "",
             "| figure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows.items())]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if os.environ.get("RELIABILITY_REPORT"):
        with open(os.environ["RELIABILITY_REPORT"], "a") as out:
            out.write(text + "\n")


def test_creates_retried_with_their_key_through_a_failover_make_one_customer_each(
        tmp_path, tls_redis_server_binary):
    cluster = LocalCluster(tls_redis_server_binary, tmp_path, replicas=1, tls=True, acl=True)
    victim, promoted = cluster.nodes[0], cluster.nodes[3]  # a primary and its replica
    try:
        cluster.start()
        with ServiceProcess({**cluster.service_env(), **SERVICE}) as service:
            load = KeyedCreates(service.url).start()
            load.wait_for_created(100)
            promoted_after, _ = cluster.fail_over(victim, promoted)
            load.wait_for_created(100)
            load.stop()
            listed = call(service.url + "/customers", timeout=60)[2]
            replays = [call(service.url + "/customers", "POST", {"key": key, "n": int(
                key.rsplit("-", 1)[1])}, headers={"Idempotency-Key": key}) for key in load.created]
    finally:
        cluster.stop()
    per_key = collections.Counter(customer["key"] for customer in listed)
    report({"keys": len(load.created) + len(load.unresolved),
            "keys answered 201": len(load.created),
            "answers by status": ", ".join(f"{status}: {count}" for status, count
                                           in sorted(load.answers.items())),
            "keys answered 201 after a retry": f"{load.retried} ({load.replayed} of them "
                                               "replays: an earlier attempt had created it)",
            "customers": len(listed),
            "keys with more than one customer": sum(count > 1 for count in per_key.values()),
            "keys answered 201 without their customer": sum(
                key not in per_key for key in load.created),
            "longest unavailability": f"{load.longest_unavailability():.1f} s",
            "replica promoted after": f"{promoted_after:.1f} s"})
    assert load.unresolved == [], service.printed[-3000:]
    assert load.answers["503"] + load.answers["409"] + load.answers["timeout"] > 0
    # Exactly one customer per key, the one its 201 named, and no customer without a key.
    assert per_key == collections.Counter(load.created.keys())
    assert {customer["key"]: customer["id"] for customer in listed} == load.created
    for (status, headers, body), (key, customer_id) in zip(replays, load.created.items(),
                                                            strict=True):
        assert (status, headers["Idempotent-Replayed"], body["id"]) == (201, "true",
                                                                         customer_id), key
    assert "Traceback" not in service.printed
