"""Measure the CPU a GET of one customer costs the service with metrics on and with them off.

Over HTTP: starts a local 3-primary Redis Cluster, loads customers, runs the service twice
(METRICS=true and METRICS=false, same workers and threads), loads each with wrk's GETs in
turns and divides the CPU time of each service's processes (main and workers) by the
requests served. On a busy machine those figures move by several percent from one run to the
next, so the CPU that metrics add to a request is also measured alone: the app is called
in-process (over fakeredis, metrics files as with several workers), with and without metrics,
in short batches taking turns, the fastest batch of each kept.
"""

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests"), str(HERE)]

from bench import loaded, wrk  # noqa: E402

from embedded import find_redis_server  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user and system) used so far by a process and its children."""
    parent = psutil.Process(pid)
    total = 0.0
    for process in (parent, *parent.children(recursive=True)):
        times = process.cpu_times()
        total += times.user + times.system
    return total


def cpu_per_get(service, ids: int, seconds: int, connections: int) -> float:
    """Load the service with GETs for `seconds` and return its CPU microseconds per request."""
    before = cpu_seconds(service.process.pid)
    result = wrk(service.url, "get", ids, seconds, connections)
    used = cpu_seconds(service.process.pid) - before
    return used / result["requests"] * 1e6


def in_process_cost(batches: int = 80, size: int = 300) -> tuple[float, float]:
    """Return the CPU microseconds of an in-process GET without metrics, and what metrics add."""
    import fakeredis

    import metrics
    from server import create_app
    from settings import Config

    redis = fakeredis.FakeRedis(decode_responses=True)
    redis.hset("customer:1", mapping={"name": "Joe", "email": "joe@example.com"})

    def batch(app) -> float:
        started = time.process_time()
        for _ in range(size):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/customers/1",
                       "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "QUERY_STRING": "",
                       "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                       "wsgi.input": io.BytesIO()}
            body = app(environ, lambda status, headers, exc_info=None: None)
            b"".join(body)
            body.close()
        return (time.process_time() - started) / size * 1e6

    logging.disable(logging.INFO)  # the request log costs the same either way
    with metrics.shared_directory():
        apps = {on: create_app(Config(metrics=on), redis) for on in (True, False)}
        timed = {on: [] for on in apps}
        for _ in range(batches):
            for on, app in apps.items():
                timed[on].append(batch(app))
    logging.disable(logging.NOTSET)
    return min(timed[False]), min(timed[True]) - min(timed[False])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10000, help="customers to GET")
    parser.add_argument("--rounds", type=int, default=9,
                        help="turns of each service (0: the in-process figure only)")
    parser.add_argument("--seconds", type=int, default=4, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    args = parser.parse_args()
    if args.rounds == 0:
        app_alone, added = in_process_cost()
        print(f"in-process, the app alone: {app_alone:.0f} us a GET, metrics add {added:.1f} us")
        return 0
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory, appendfsync="everysec") as cluster:
        env = loaded(cluster, args.ids)
        services = {"on": ServiceProcess({**env, "METRICS": "true"}, cwd=directory),
                    "off": ServiceProcess({**env, "METRICS": "false"}, cwd=directory)}
        figures = {name: [] for name in services}
        try:
            for service in services.values():
                service.start()
                wrk(service.url, "get", args.ids, 2, args.connections)  # connect, warm up
            for turn in range(args.rounds):
                # Taking turns, a machine that slows down for a while slows both alike.
                for name in (("on", "off") if turn % 2 == 0 else ("off", "on")):
                    figures[name].append(cpu_per_get(services[name], args.ids, args.seconds,
                                                     args.connections))
                print(f"round {turn + 1}: on {figures['on'][-1]:.0f} us, "
                      f"off {figures['off'][-1]:.0f} us", flush=True)
        finally:
            for service in services.values():
                if service.process:
                    service.stop()
    ratios = [on / off for on, off in zip(figures["on"], figures["off"], strict=True)]
    on, off = statistics.median(figures["on"]), statistics.median(figures["off"])
    print(f"over HTTP, CPU per GET /customers/<id> ({os.cpu_count()} cores): metrics on "
          f"{on:.0f} us, off {off:.0f} us; median of {args.rounds} paired rounds "
          f"{(statistics.median(ratios) - 1) * 100:+.1f}% (rounds from "
          f"{(min(ratios) - 1) * 100:+.1f}% to {(max(ratios) - 1) * 100:+.1f}%)", flush=True)
    app_alone, added = in_process_cost()
    print(f"in-process, the app alone: {app_alone:.0f} us a GET, metrics add {added:.1f} us: "
          f"{added / off * 100:+.1f}% of the {off:.0f} us a GET costs the service over HTTP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
