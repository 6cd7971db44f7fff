"""A bounded mixed load (creates, updates, reads, lists) that records every acknowledged write."""

import collections
import http.client
import os
import random
import threading
import time
from dataclasses import dataclass, field

from http_client import call

MIX = ("create", "update", "update", "read", "read", "list")


@dataclass
class Outcome:
    """One request: what it was, how it ended, and when."""

    op: str
    status: str
    started: float
    ended: float

    @property
    def ok(self) -> bool:
        """Whether the service answered as it does when the database is healthy."""
        return self.status in ("200", "201", "204")


@dataclass
class MixedLoad:
    """Threads sending a mix of requests until stopped, bounded in count and time."""

    url: str
    threads: int = 4
    max_requests: int = 20000
    max_seconds: float = 120.0
    timeout: float = 15.0
    outcomes: list = field(default_factory=list)
    # id -> highest "v" acknowledged (201 or 204); the stored "v" must never be lower.
    acknowledged: dict = field(default_factory=dict)
    # id -> highest "v" sent, acknowledged or not (a failed write may have been applied).
    attempted: dict = field(default_factory=dict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = []

    def start(self) -> "MixedLoad":
        """Start the threads."""
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(random.Random(index),), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> "MixedLoad":
        """Stop the threads and wait for their last requests."""
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 5)
        return self

    def wait_for_successes(self, count: int, timeout: float = 30.0) -> None:
        """Wait until count more requests than now have succeeded."""
        target = self.successes() + count
        deadline = time.monotonic() + timeout
        while self.successes() < target:
            if time.monotonic() > deadline or self._stop.is_set():
                raise AssertionError(f"fewer than {count} successes in {timeout}s")
            time.sleep(0.05)

    def successes(self) -> int:
        """Return how many requests have succeeded so far."""
        with self._lock:
            return sum(outcome.ok for outcome in self.outcomes)

    def _run(self, rng):
        mine = []
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
            with self._lock:
                if len(self.outcomes) >= self.max_requests:
                    return
            op = rng.choice(MIX) if mine else "create"
            customer_id = rng.choice(mine) if mine else None
            self._send(op, customer_id, mine)

    def _send(self, op, customer_id, mine):
        begun = time.monotonic()
        version = None
        try:
            if op == "create":
                status, _, body = call(self.url + "/customers", "POST", {"v": 0, "n": begun},
                                       timeout=self.timeout)
                if status == 201:
                    mine.append(body["id"])
                    self._record_write(body["id"], 0, acknowledged=True)
            elif op == "update":
                with self._lock:
                    version = self.attempted[customer_id] + 1
                self._record_write(customer_id, version, acknowledged=False)
                status = call(f"{self.url}/customers/{customer_id}", "PUT", {"v": version},
                              timeout=self.timeout)[0]
                if status == 204:
                    self._record_write(customer_id, version, acknowledged=True)
            elif op == "read":
                status = call(f"{self.url}/customers/{customer_id}", timeout=self.timeout)[0]
            else:
                status = call(self.url + "/customers", timeout=self.timeout)[0]
            status = str(status)
        except (ValueError, http.client.HTTPException):
            # A 200 whose JSON body stops short: a streamed list cut off by the database.
            status = "cut-off list" if op == "list" else "bad JSON"
        except OSError as error:
            status = "timeout" if "timed out" in str(error) else type(error).__name__
        with self._lock:
            self.outcomes.append(Outcome(op, status, begun, time.monotonic()))

    def _record_write(self, customer_id, version, acknowledged):
        with self._lock:
            self.attempted[customer_id] = max(self.attempted.get(customer_id, 0), version)
            if acknowledged:
                self.acknowledged[customer_id] = max(self.acknowledged.get(customer_id, 0),
                                                     version)

    def lost_writes(self, url: str) -> list:
        """Return the ids whose acknowledged write the service at url cannot read back now."""
        lost = []
        for customer_id, version in self.acknowledged.items():
            body = read_back(f"{url}/customers/{customer_id}")
            if body is None or not version <= body.get("v", -1) <= self.attempted[customer_id]:
                lost.append(customer_id)
        return lost

    def errors_by_status(self) -> dict:
        """Count the requests that did not succeed, by status (or client-side error)."""
        return dict(sorted(collections.Counter(
            outcome.status for outcome in self.outcomes if not outcome.ok).items()))

    def longest_unavailability(self, gap: float = 1.0) -> float:
        """Return the longest stretch of failures (less than gap seconds apart), in seconds."""
        failures = sorted((outcome.started, outcome.ended)
                          for outcome in self.outcomes if not outcome.ok)
        longest, start, end = 0.0, None, None
        for began, ended in failures:
            if start is None or began > end + gap:
                start, end = began, ended
            end = max(end, ended)
            longest = max(longest, end - start)
        return longest

    def slowest(self) -> float:
        """Return the longest time a request took, in seconds."""
        return max((outcome.ended - outcome.started for outcome in self.outcomes), default=0.0)

    def table(self, fault: str, lost: int, notes: dict | None = None) -> str:
        """Return the fault's figures (and notes: more rows) as a Markdown table."""
        writes = sum(1 for outcome in self.outcomes
                     if outcome.op in ("create", "update") and outcome.ok)
        errors = ", ".join(f"{status}: {count}" for status, count in
                           self.errors_by_status().items()) or "none"
        rows = [("requests", len(self.outcomes)), ("acknowledged writes", writes),
                ("lost writes", lost), ("errors by status", errors),
                ("longest unavailability", f"{self.longest_unavailability():.1f} s"),
                *(notes or {}).items()]
        lines = [f"### {fault}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines) + "\n"


def read_back(url: str):
    """Return the customer at url, or None when there is none; retries 503s for a while."""
    for _ in range(20):
        status, _, body = call(url, timeout=30)
        if status != 503:
            return body if status == 200 else None
    raise AssertionError(f"{url} still answers 503")


def wait_until(predicate, timeout: float = 60.0) -> None:
    """Poll predicate until it is true, failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def report(fault: str, load: MixedLoad, lost: int, notes: dict | None = None) -> str:
    """Print the fault's table, and append it to the file named by RELIABILITY_REPORT if set."""
    text = load.table(fault, lost, notes)
    print("\n" + text)
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(text + "\n")
    return text
