"""Measure the CPU the service spends on a request, against a no-op Flask route on the same server.

Starts a local 3-primary Redis Cluster (appendfsync everysec, as make bench), loads customers,
then runs two servers: the service as `python3 src/server.py` runs it, and a Flask app whose
only route answers a constant, served by the service's own serving code (serving.serve: the
same granian settings, WORKERS and THREADS, request slots and deadlines). wrk loads each in
turn (the no-op route, GET by id, PUT, POST), the order rotating every round, and the CPU
time of each server's processes (main and workers) is divided by the requests served. CPU per
request moves less than requests/s when other programs share the machine; medians are printed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests"), str(HERE)]

from bench import loaded, wait_http, wrk  # noqa: E402

from embedded import find_redis_server, free_port  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

TARGETS = ("noop", "get", "put", "post")
LABELS = {"noop": "no-op Flask route", "get": "GET /customers/<id>",
          "put": "PUT /customers/<id>", "post": "POST /customers"}


def noop_app():
    """Return a Flask app that answers GET /customers/<id> with a constant JSON body."""
    from flask import Flask

    app = Flask(__name__)

    @app.get("/customers/<path:customer_id>")
    def noop(customer_id):
        return {"id": "noop"}

    return app


def serve_noop() -> int:
    """Serve the no-op app as the service is served (HOST, PORT, WORKERS, THREADS from env)."""
    import serving
    from settings import load_config

    serving.serve(noop_app, load_config())
    return 0


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user and system) used so far by a process and its children."""
    parent = psutil.Process(pid)
    total = 0.0
    for process in (parent, *parent.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(url: str, pid: int, mode: str, ids: int, seconds: int, connections: int) -> tuple:
    """Load url with wrk; return the server's CPU microseconds per request, and requests/s."""
    before = cpu_seconds(pid)
    result = wrk(url, "get" if mode == "noop" else mode, ids, seconds, connections)
    used = cpu_seconds(pid) - before
    return used / result["requests"] * 1e6, result["rps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10000, help="customers to GET and PUT")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each target")
    parser.add_argument("--seconds", type=int, default=3, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        return serve_noop()
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory, appendfsync="everysec") as cluster:
        env = loaded(cluster, args.ids)
        service = ServiceProcess(env, cwd=directory)
        noop_port = free_port()
        noop = None
        figures = {target: [] for target in TARGETS}
        try:
            service.start()
            noop = subprocess.Popen(
                [sys.executable, __file__, "--serve-noop"], cwd=directory,
                env={**os.environ, "HOST": "127.0.0.1", "PORT": str(noop_port),
                     "LOG_LEVEL": "WARNING", "METRICS": "false"},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            noop_url = f"http://127.0.0.1:{noop_port}"
            wait_http(noop_url, noop)
            servers = {"noop": (noop_url, noop.pid)}
            servers.update({mode: (service.url, service.process.pid) for mode in TARGETS[1:]})
            for target, (url, _) in servers.items():  # connect, warm up
                wrk(url, "get" if target == "noop" else target, args.ids, 1, args.connections)
            for turn in range(args.rounds):
                # Taking turns, a machine that slows down for a while slows every target alike.
                order = TARGETS[turn % len(TARGETS):] + TARGETS[:turn % len(TARGETS)]
                for target in order:
                    url, pid = servers[target]
                    figures[target].append(measure(url, pid, target, args.ids, args.seconds,
                                                   args.connections))
                print(f"round {turn + 1}: " + ", ".join(
                    f"{target} {figures[target][-1][0]:.0f} us" for target in TARGETS),
                    flush=True)
        finally:
            if noop is not None:
                noop.terminate()
                noop.wait(30)
            if service.process:
                service.stop()
    noop_cpu = statistics.median(cpu for cpu, _ in figures["noop"])
    print(f"\nCPU per request, median of {args.rounds} rounds ({os.cpu_count()} cores, "
          f"wrk -t2 -c{args.connections}, {args.seconds} s a run)")
    print("| request | CPU us / request | x no-op | requests/s |")
    print("| --- | ---: | ---: | ---: |")
    for target in TARGETS:
        cpu = statistics.median(cpu for cpu, _ in figures[target])
        rps = statistics.median(rps for _, rps in figures[target])
        print(f"| {LABELS[target]} | {cpu:.0f} | {cpu / noop_cpu:.2f} | {rps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
