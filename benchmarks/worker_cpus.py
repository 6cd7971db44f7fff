"""Measure the service with its workers on CPUs of their own (PIN_WORKERS) against without.

Starts a local 3-primary Redis Cluster, loads customers, runs the service twice (PIN_WORKERS
true and false, one worker per CPU, the default), and loads each in turns with wrk's GETs,
PUTs and POSTs: requests/s, p99 and the CPU time of the service's processes per request,
medians of the rounds; then lists every customer of a fresh set, in turns too.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests"), str(HERE)]

from bench import list_all, loaded, wrk  # noqa: E402
from metrics_overhead import cpu_seconds  # noqa: E402

from embedded import find_redis_server  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

MODES = ("get", "put", "post")


def measured(service, mode: str, ids: int, seconds: int, connections: int) -> dict:
    """Load the service with one kind of request; return requests/s, p99 and CPU a request."""
    before = cpu_seconds(service.process.pid)
    result = wrk(service.url, mode, ids, seconds, connections)
    used = cpu_seconds(service.process.pid) - before
    return {"rps": result["rps"], "p99_ms": result["p99_ms"],
            "cpu_us": used / result["requests"] * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10000, help="customers loaded and listed")
    parser.add_argument("--rounds", type=int, default=4, help="turns of each service")
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--appendfsync", default="everysec", choices=("everysec", "always"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory, appendfsync=args.appendfsync) \
            as cluster:
        env = loaded(cluster, args.ids)
        services = {"pinned": ServiceProcess({**env, "PIN_WORKERS": "true"}, cwd=directory),
                    "free": ServiceProcess({**env, "PIN_WORKERS": "false"}, cwd=directory)}
        figures = {(name, mode): [] for name in services for mode in MODES}
        lists = {name: [] for name in services}
        paired = won = 0
        try:
            for service in services.values():
                service.start()
                wrk(service.url, "get", args.ids, 2, args.connections)  # connect, warm up
            # Lists first, while the database holds only the customers loaded.
            for turn in range(7):
                for name in (("pinned", "free") if turn % 2 == 0 else ("free", "pinned")):
                    lists[name].append(list_all(services[name].url, args.ids)["seconds"])
            for turn in range(args.rounds):
                for mode in MODES:
                    # Taking turns, a machine that slows down for a while slows both alike.
                    for name in (("pinned", "free") if turn % 2 == 0 else ("free", "pinned")):
                        figures[name, mode].append(measured(
                            services[name], mode, args.ids, args.seconds, args.connections))
                    pinned, free = figures["pinned", mode][-1], figures["free", mode][-1]
                    paired, won = paired + 1, won + (pinned["rps"] > free["rps"])
                    print(f"round {turn + 1} {mode}: pinned {pinned['rps']:.0f}/s "
                          f"{pinned['cpu_us']:.0f} us, free {free['rps']:.0f}/s "
                          f"{free['cpu_us']:.0f} us", flush=True)
        finally:
            for service in services.values():
                if service.process:
                    service.stop()
    print(f"\nPIN_WORKERS true against false, {os.cpu_count()} CPUs, appendfsync "
          f"{args.appendfsync}, wrk {args.connections} connections, medians of {args.rounds} "
          "rounds:\n")
    print("| request | requests/s, free / pinned | CPU a request, us | p99, ms |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        median = {name: {figure: statistics.median(run[figure] for run in figures[name, mode])
                         for figure in ("rps", "cpu_us", "p99_ms")} for name in services}
        free, pinned = median["free"], median["pinned"]
        print(f"| {mode.upper()} | {free['rps']:,.0f} / {pinned['rps']:,.0f} "
              f"({(pinned['rps'] / free['rps'] - 1) * 100:+.0f}%) | {free['cpu_us']:.0f} / "
              f"{pinned['cpu_us']:.0f} | {free['p99_ms']:.1f} / {pinned['p99_ms']:.1f} |")
    print(f"| list {args.ids:,} customers, s (median of 7) | "
          f"{statistics.median(lists['free']):.3f} / {statistics.median(lists['pinned']):.3f} "
          "| | |")
    print(f"\npinned served more in {won} of {paired} paired runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
