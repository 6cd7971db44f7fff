"""What `make bench` decides without measuring: its verdicts, and a baseline that serves."""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from embedded import free_port

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402


@pytest.mark.parametrize(("ratios", "bound", "at_least", "expected"), [
    ([5.4, 5.0], 5, True, ">= 5: met"),
    ([5.4, 4.45], 5, True, ">= 5: missed (original)"),
    ([3.8, 3.7], 5, True, ">= 5: missed (rebuild, original)"),
    ([0.49, 0.5], 0.5, False, "<= 0.5: met"),
    ([0.92, 0.43], 0.5, False, "<= 0.5: missed (rebuild)"),
])
def test_a_target_is_met_only_against_both_baselines(ratios, bound, at_least, expected):
    assert bench.verdict(ratios, bound, at_least) == expected


def results(appendfsync: str, post_ratio: float) -> dict:
    """Return bench.py's results of a run where the service is twice as fast but for POST."""
    figures = {"rps": 1000.0, "p50_ms": 10.0, "p99_ms": 20.0}
    ours = {"get": {"rps": 6000.0, "p50_ms": 2.0, "p99_ms": 5.0},
            "put": {"rps": 3000.0, "p50_ms": 3.0, "p99_ms": 8.0},
            "post": {"rps": 1000.0 * post_ratio, "p50_ms": 3.0, "p99_ms": 8.0},
            "list_small": {"seconds": 0.04}}
    theirs = {mode: dict(figures) for mode in bench.MODES} | {"list_small": {"seconds": 1.0}}
    return {"service": ours, "rebuild": theirs, "original": theirs,
            "settings": {"appendfsync": appendfsync, "ids": 10000, "connections": 16,
                         "seconds": 6, "rounds": 3, "imports_only": False,
                         "requests_only": True},
            "load_before": "1.00, 1.00, 1.00", "load_after": "1.00, 1.00, 1.00"}


@pytest.mark.parametrize(("appendfsync", "post_ratio", "expected"), [
    ("everysec", 3.5, ">= 4: missed (rebuild, original)"),
    ("always", 3.5, ">= 3: met"),
    ("always", 2.9, ">= 3: missed (rebuild, original)"),
])
def test_the_post_target_depends_on_the_durability_setting(appendfsync, post_ratio, expected):
    lines = bench.table(results(appendfsync, post_ratio)).splitlines()
    post = next(line for line in lines if line.startswith("| POST /customers requests/s"))
    assert post.endswith(f"| {expected} |")
    get = next(line for line in lines if line.startswith("| GET /customers/<id> requests/s"))
    assert get.endswith("| >= 5: met |")
    listed = next(line for line in lines if line.startswith("| list 10,000"))
    assert "25.0x faster" in listed and listed.endswith("| >= 20: met |")


def call(method: str, url: str, body: dict | None = None) -> tuple:
    """Send a request; return its status and JSON body (None when it has none)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text.strip() else None
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.mark.cluster
def test_the_rebuilt_baseline_serves_post_get_and_the_list_on_a_real_cluster(redis_cluster):
    port = free_port()
    env = {**os.environ, "DBHOST": "127.0.0.1", "DBPORT": str(redis_cluster.nodes[0].port)}
    baseline = subprocess.Popen([sys.executable, str(BENCHMARKS / "baseline.py"), str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/customers"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert baseline.poll() is None, "baseline.py exited"
            try:
                status, created = call("POST", url, {"name": "Joe", "balance": "10"})
                break
            except OSError:
                assert time.monotonic() < deadline, "baseline.py did not answer"
                time.sleep(0.1)
        assert status == 201 and created["name"] == "Joe"
        assert call("GET", f"{url}/{created['id']}") == (200, created)
        status, listed = call("GET", url)
        assert status == 200 and created in listed
        assert call("DELETE", f"{url}/{created['id']}") == (204, None)
        assert call("GET", f"{url}/{created['id']}")[0] == 404
    finally:
        baseline.terminate()
        baseline.wait(30)


def test_each_figure_is_the_median_of_rounds_the_servers_taking_turns():
    order = []
    figures = iter([{"rps": rps, "p50_ms": rps / 100, "p99_ms": rps / 10}
                    for rps in (100, 900, 300, 700, 200, 800)])

    def measure(url, mode, ids, seconds, connections):
        order.append(url)
        return next(figures)

    args = argparse.Namespace(rounds=3, ids=10, seconds=1, connections=2)
    medians = bench.median_requests({"service": "s", "rebuild": "r"}, "get", args, measure)
    assert order == ["s", "r", "s", "r", "s", "r"]
    assert {name: medians[name]["rps"] for name in medians} == {"service": 200, "rebuild": 800}
    assert medians["service"]["p99_ms"] == 20 and len(medians["service"]["rounds"]) == 3
