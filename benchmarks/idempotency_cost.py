"""Measure what an Idempotency-Key costs a POST /customers: requests/s with and without one.

Starts a local 3-primary Redis Cluster (AOF, appendfsync everysec, as bench.py) and the
service, then runs wrk (benchmarks/load.lua) on POST without a key and POST with a new key
each request, taking turns for several rounds so that a slower stretch of a shared machine
slows both alike. Prints the medians and the ratio (the issue's bound: at most 25% slower).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests"), str(HERE)]

from bench import wrk  # noqa: E402

from embedded import find_redis_server  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

MODES = {"post": "POST /customers", "post_key": "POST /customers with an Idempotency-Key"}


def cpu_seconds(pids: list) -> float:
    """Return the user and system CPU time of processes and their children so far."""
    total = 0.0
    for pid in pids:
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            times = member.cpu_times()
            total += times.user + times.system
    return total


def measure(args) -> dict:
    """Return each mode's wrk results, round by round."""
    runs = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory, appendfsync="everysec") as cluster:
        env = {**cluster.service_env(), "LOG_LEVEL": "WARNING"}
        with ServiceProcess(env, cwd=directory) as service:
            for mode in MODES:  # warm-up: connections to every node, scripts loaded
                wrk(service.url, mode, 1, 2, args.connections)
            for round_number in range(args.rounds):
                order = list(MODES) if round_number % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    before = (cpu_seconds([service.process.pid]),
                              cpu_seconds([node.process.pid for node in cluster.nodes]))
                    result = wrk(service.url, mode, 1, args.seconds, args.connections)
                    # CPU per request: what other programs on a shared machine move least.
                    result["service_cpu_ms"] = (cpu_seconds([service.process.pid])
                                                - before[0]) * 1000 / result["requests"]
                    result["redis_cpu_ms"] = (cpu_seconds([node.process.pid for node in
                                                           cluster.nodes])
                                              - before[1]) * 1000 / result["requests"]
                    runs[mode].append(result)
                    print(f"round {round_number + 1}: {MODES[mode]}: {result['rps']:.0f} "
                          f"requests/s, CPU a request: service {result['service_cpu_ms']:.3f} "
                          f"ms, redis-servers {result['redis_cpu_ms']:.3f} ms", flush=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="turns of each mode")
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is missing: `make bench` installs it (apt-get install wrk)", file=sys.stderr)
        return 2
    runs = measure(args)
    medians = {mode: {figure: statistics.median(run[figure] for run in runs[mode])
                      for figure in ("rps", "p50_ms", "p99_ms", "service_cpu_ms",
                                     "redis_cpu_ms")} for mode in MODES}
    ratio = medians["post_key"]["rps"] / medians["post"]["rps"]
    cpu = {mode: medians[mode]["service_cpu_ms"] + medians[mode]["redis_cpu_ms"]
           for mode in MODES}
    lines = ["| figure (median of the rounds) | requests/s | p50 ms | p99 ms | CPU ms a "
             "request (service + redis-servers) |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {MODES[mode]} | {medians[mode]['rps']:.0f} | {medians[mode]['p50_ms']:.1f} "
              f"| {medians[mode]['p99_ms']:.1f} | {medians[mode]['service_cpu_ms']:.3f} + "
              f"{medians[mode]['redis_cpu_ms']:.3f} |" for mode in MODES]
    print("\n".join(lines))
    print(f"with a key / without: {ratio:.2f} of the requests/s "
          f"({(1 / ratio - 1) * 100:.0f}% more time a request), "
          f"{cpu['post_key'] / cpu['post']:.2f} of the CPU a request; the bound: 25% slower "
          f"(on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "idempotency-latest.json").write_text(json.dumps(
        {"finished": finished, "settings": vars(args), "medians": medians, "ratio": ratio,
         "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
