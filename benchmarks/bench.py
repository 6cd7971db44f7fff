"""Benchmark the service against two baselines of the original example, in one run.

Starts a local 3-primary Redis Cluster (AOF, appendfsync everysec or always), loads
customers, then measures with wrk from a separate process, the same connections and
duration for each, taking turns: the service, the original's design rebuilt on redis-py 8
(baseline.py), and the same file on the original's own stack and client (redis-py-cluster
2.1.3, Flask 2.0.2) in benchmarks/.venv-original.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from embedded import find_redis_server, free_port  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

ORIGINAL_PYTHON = HERE / ".venv-original" / "bin" / "python"
BASELINES = {"rebuild": "rebuild (redis-py 8)", "original": "original (redis-py-cluster)"}
MODES = {"get": "GET /customers/<id>", "put": "PUT /customers/<id>", "post": "POST /customers"}
# The targets against each baseline, same run: requests/s at least so many times
# theirs, by durability setting; p99 at most half of theirs; the 10,000 list 20 times faster.
RPS_TARGETS = {"everysec": {"get": 5, "post": 4}, "always": {"get": 5, "post": 3}}
P99_TARGET = 0.5
LIST_TARGET = 20

FIELDS = {"name": "Joe", "lastName": "Doe", "email": "joe@example.com", "phone": "+1 555 0100",
          "balance": "1000", "_type:balance": "int"}
# The same customer as an NDJSON line (load.lua's body), its id inserted before it.
LINE = b'"name":"Joe","lastName":"Doe","email":"joe@example.com","phone":"+1 555 0100",' \
       b'"balance":1000}\n'


def load(cluster_client, start: int, stop: int) -> None:
    """Store customers bench<start> .. bench<stop - 1>, in pipelines."""
    for first in range(start, stop, 20000):
        pipe = cluster_client.pipeline(transaction=False)
        for n in range(first, min(first + 20000, stop)):
            pipe.hset(f"customer:bench{n}", mapping=FIELDS)
        pipe.execute()


def loaded(cluster, ids: int) -> dict:
    """Store ids customers in a local cluster; return the service's environment for it."""
    from redis.cluster import RedisCluster

    db = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
    try:
        load(db, 0, ids)
    finally:
        db.close()
    return {**cluster.service_env(), "LOG_LEVEL": "WARNING"}


def stored(db) -> int:
    """Return how many keys the primaries hold."""
    return sum(db.get_redis_connection(node).dbsize() for node in db.get_primaries())


def wait_http(url: str, process, timeout: float = 30) -> None:
    """Wait until a server answers HTTP at url."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            urllib.request.urlopen(url + "/customers/bench0", timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer in time")


def wrk(url: str, mode: str, ids: int, seconds: int, connections: int) -> dict:
    """Run wrk against url and return its requests/s, p50 and p99."""
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_IDS": str(ids)}
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                          "-s", str(HERE / "load.lua"), url], env=env, capture_output=True,
                         text=True, timeout=seconds + 60, check=True).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    result["rps"] = result["requests"] / result["seconds"]
    if result["socket_errors"] or result["non_2xx"]:
        print(f"  warning: {url} {mode}: {result}", flush=True)
    return result


class PeakRss:
    """Sample the summed RSS of a process and its children until stopped."""

    def __init__(self, pid: int | None):
        self.process = psutil.Process(pid) if pid else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """Return the summed RSS now (0 if a process went away meanwhile)."""
        try:
            processes = [self.process, *self.process.children(recursive=True)]
            return sum(process.memory_info().rss for process in processes)
        except psutil.Error:
            return 0

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.sample())

    def __enter__(self):
        if self.process:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.process:
            self._thread.join()


def ndjson(prefix: str, start: int, stop: int):
    """Yield NDJSON lines of customers <prefix><start> .. <prefix><stop - 1>, 1,000 at a time."""
    for first in range(start, stop, 1000):
        yield b"".join(b'{"id":"%s%d",' % (prefix.encode(), n) + LINE
                       for n in range(first, min(first + 1000, stop)))


def import_all(url: str, prefix: str, start: int, stop: int, pid: int | None = None) -> dict:
    """POST customers as one chunked NDJSON body; return its seconds, rate, summary, peak RSS."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    before = PeakRss(pid).sample() if pid else 0
    with PeakRss(pid) as rss:
        started = time.perf_counter()
        connection.request("POST", "/customers", ndjson(prefix, start, stop),
                           {"Content-Type": "application/x-ndjson"}, encode_chunked=True)
        response = connection.getresponse()
        summary = json.loads(response.read())
        seconds = time.perf_counter() - started
    connection.close()
    if response.status != 200 or summary["created"] + summary["updated"] != stop - start:
        raise RuntimeError(f"import of {stop - start}: {response.status} {summary}")
    return {"customers": stop - start, "seconds": seconds, "per_second": (stop - start) / seconds,
            "created": summary["created"], "updated": summary["updated"],
            "peak_rss_mb": rss.peak / 2**20 if pid else None,
            "rss_before_mb": before / 2**20 if pid else None}


def list_all(url: str, expected: int, pid: int | None = None, exact: bool = True,
             accept: str = "application/json") -> dict:
    """GET the whole list; return its seconds, first-byte seconds and the server's peak RSS."""
    request = urllib.request.Request(url + "/customers", headers={"Accept": accept})
    with PeakRss(pid) as rss:
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read(1)
            first_byte = time.perf_counter() - started
            body = response.read()
        seconds = time.perf_counter() - started
    count = body.count(b'"id"')
    # The original repeats what SCAN repeats: there more is reported, less is a failure.
    if count < expected or exact and count != expected:
        raise RuntimeError(f"{url} listed {count} customers, expected {expected}")
    return {"seconds": seconds, "first_byte_seconds": first_byte, "listed": count,
            "peak_rss_mb": rss.peak / 2**20 if pid else None}


def median_lists(targets: dict, expected: int, runs: int = 7, warmup: int = 2) -> dict:
    """Return each service's list with the median time, the services taking turns."""
    # The first lists of a fresh process pay for connecting to every node (both services).
    for _ in range(warmup):
        for url in targets.values():
            list_all(url, expected, exact=False)
    # Taking turns, a machine that slows down for a while slows both services alike.
    timed = {name: [] for name in targets}
    for _ in range(runs):
        for name, url in targets.items():
            timed[name].append(list_all(url, expected))
    return {name: sorted(lists, key=lambda run: run["seconds"])[runs // 2]
            for name, lists in timed.items()}


def median_requests(targets: dict, mode: str, args, measure=wrk) -> dict:
    """Return each server's median requests/s, p50 and p99 over args.rounds wrk runs, the
    servers taking turns (a slow stretch of the machine slows one round of each, not one server)."""
    rounds = {name: [] for name in targets}
    for number in range(args.rounds):
        for name, url in targets.items():
            print(f"{mode.upper()} on the {name} for {args.seconds}s (round {number + 1} of "
                  f"{args.rounds})", flush=True)
            rounds[name].append(measure(url, mode, args.ids, args.seconds, args.connections))
    return {name: {**{figure: statistics.median(run[figure] for run in runs)
                      for figure in ("rps", "p50_ms", "p99_ms")}, "rounds": runs}
            for name, runs in rounds.items()}


def start_baseline(python: str, client: str, env: dict) -> tuple:
    """Start baseline.py with python on client ("redis" or "rediscluster"); return it, its URL."""
    port = free_port()
    process = subprocess.Popen([python, str(HERE / "baseline.py"), str(port)],
                               env={**os.environ, **env, "BASELINE_CLIENT": client},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def run(args) -> dict:
    """Measure the service and both baselines on one cluster and return the figures."""
    results = {"service": {}, "rebuild": {}, "original": {}, "settings": vars(args)}
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory,
                         appendfsync=args.appendfsync) as cluster:
        from redis.cluster import RedisCluster
        db = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
        load(db, 0, args.ids)
        env = {"DBHOST": "127.0.0.1", "DBPORT": str(cluster.nodes[0].port), "DBTLS": "false",
               "LOG_LEVEL": "WARNING"}
        service = ServiceProcess(env, cwd=directory).start()
        rebuild, rebuild_url = start_baseline(sys.executable, "redis", env)
        original, original_url = start_baseline(args.original_python, "rediscluster", env)
        targets = {"service": service.url, "rebuild": rebuild_url, "original": original_url}
        try:
            wait_http(rebuild_url, rebuild)
            wait_http(original_url, original)
            if not args.imports_only:
                print(f"listing {args.ids} with each, in turns", flush=True)
                for name, listed in median_lists(targets, args.ids).items():
                    results[name]["list_small"] = listed
            for mode in ("put",) if args.imports_only else MODES:
                for name, figures in median_requests(targets, mode, args).items():
                    results[name][mode] = figures
            if args.requests_only:
                return results
            time.sleep(2)  # let the requests still queued when wrk stopped finish
            print(f"importing {args.imports} new customers (NDJSON) into the service, 3 times",
                  flush=True)
            # The median of three: one import takes seconds, which a busy machine can spoil.
            imports = [import_all(service.url, f"import{run}-", 0, args.imports)
                       for run in range(3)]
            results["service"]["import"] = sorted(imports, key=lambda run: run["seconds"])[1]
            results["service"]["import"]["all_per_second"] = [run["per_second"]
                                                              for run in imports]
            db.flushall(target_nodes=RedisCluster.PRIMARIES)
            load(db, 0, args.baseline_big)
            if not args.imports_only:
                print(f"listing {stored(db)} with the rebuild", flush=True)
                results["rebuild"]["list_big"] = {
                    "customers": stored(db),
                    **list_all(rebuild_url, stored(db), rebuild.pid, exact=False)}
            # The service's big list is loaded by an import: its peak RSS is the import's.
            print(f"importing {args.big} customers (NDJSON, {args.baseline_big} of them "
                  "stored already) into the service", flush=True)
            results["service"]["import_big"] = import_all(service.url, "bench", 0, args.big,
                                                          service.process.pid)
            print(f"exporting {stored(db)} as NDJSON from the service", flush=True)
            results["service"]["export_big"] = {
                "customers": stored(db), **list_all(service.url, stored(db), service.process.pid,
                                                     accept="application/x-ndjson")}
            if args.imports_only:
                return results
            print(f"listing {stored(db)} with the service", flush=True)
            results["service"]["list_big"] = {
                "customers": stored(db), **list_all(service.url, stored(db),
                                                     service.process.pid)}
        finally:
            for baseline in (rebuild, original):
                baseline.terminate()
                baseline.wait(30)
            service.stop()
            db.close()
    return results


def verdict(ratios: list, bound: float, at_least: bool) -> str:
    """Say whether every baseline's ratio meets a bound, naming the baselines it misses."""
    missed = [name for name, ratio in zip(BASELINES, ratios, strict=True)
              if (ratio < bound if at_least else ratio > bound)]
    sign = ">=" if at_least else "<="
    if not missed:
        return f"{sign} {bound:g}: met"
    return f"{sign} {bound:g}: missed ({', '.join(missed)})"


def row(label: str, figures: list, fmt: str, target: str = "", faster: bool = False) -> str:
    """Return a table line: the service's figure, each baseline's, the ratios and a target."""
    ours, *theirs = figures
    cells = [fmt.format(figure) for figure in figures]
    if faster:
        cells += [f"{their / ours:.1f}x faster" for their in theirs]
    else:
        cells += [f"{ours / their:.2f}" for their in theirs]
    return f"| {label} | {' | '.join(cells)} | {target} |"


def request_lines(results: dict) -> list:
    """Return the table's lines on GET, PUT and POST and on the small list, with targets."""
    names = ["service", *BASELINES]
    rps_targets = RPS_TARGETS[results["settings"]["appendfsync"]]
    lines = []
    for mode, label in MODES.items():
        figures = [results[name][mode] for name in names]
        rps = [figure["rps"] for figure in figures]
        target = rps_targets.get(mode)
        lines.append(row(f"{label} requests/s", rps, "{:.0f}",
                         verdict([rps[0] / their for their in rps[1:]], target, True)
                         if target else ""))
        for pct in ("p50", "p99"):
            ms = [figure[f"{pct}_ms"] for figure in figures]
            target = (verdict([ms[0] / their for their in ms[1:]], P99_TARGET, False)
                      if pct == "p99" else "")
            lines.append(row(f"{label} {pct} ms", ms, "{:.1f}", target))
    seconds = [results[name]["list_small"]["seconds"] for name in names]
    lines.append(row(f"list {results['settings']['ids']:,} customers, s", seconds, "{:.3f}",
                     verdict([their / seconds[0] for their in seconds[1:]], LIST_TARGET, True),
                     faster=True))
    return lines


def big_lines(results: dict) -> list:
    """Return the table's lines on the big lists, against the rebuild alone."""
    big, base_big = results["service"]["list_big"], results["rebuild"]["list_big"]
    sizes = f"(service {big['customers']:,}, rebuild {base_big['customers']:,})"
    rss = big["peak_rss_mb"]
    return [
        f"| peak RSS listing {sizes}, MB | {rss:.0f} | {base_big['peak_rss_mb']:.0f} | - | "
        f"{rss / base_big['peak_rss_mb']:.2f} | - | < 200: {'met' if rss < 200 else 'missed'} |",
        f"| list {sizes}, s | {big['seconds']:.1f} | {base_big['seconds']:.1f} | - | "
        f"{big['seconds'] / base_big['seconds']:.2f} | - | |",
        f"| customers in that list (duplicates from SCAN) | {big['listed']:,} | "
        f"{base_big['listed']:,} | - | - | - | |",
        f"| first byte of that list, s | {big['first_byte_seconds']:.3f} | "
        f"{base_big['first_byte_seconds']:.3f} | - | "
        f"{big['first_byte_seconds'] / base_big['first_byte_seconds']:.4f} | - | |"]


def table(results: dict) -> str:
    """Format the figures and their ratios to both baselines as a Markdown table."""
    settings = results["settings"]
    lines = [f"appendfsync {settings['appendfsync']}, wrk {settings['connections']} "
             f"connections, the median of {settings['rounds']} runs of {settings['seconds']} s a "
             f"figure, the servers taking turns; load average before / after: "
             f"{results['load_before']} / {results['load_after']}", "",
             "| figure | service | " + " | ".join(BASELINES.values()) + " | service / rebuild "
             "| service / original | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    if not settings["imports_only"]:
        lines += request_lines(results)
    if not settings["requests_only"]:
        lines += import_lines(results)
    if not settings["requests_only"] and not settings["imports_only"]:
        lines += big_lines(results)
    return "\n".join(lines)


def import_lines(results: dict) -> list:
    """Return the table's lines on NDJSON imports: against one PUT a customer (the original's
    way, wrk's rate), and the service's peak RSS importing the big list."""
    ours = results["service"]
    puts = [results[name]["put"]["rps"] for name in BASELINES]
    small, big, export = ours["import"], ours["import_big"], ours["export_big"]
    rate = small["per_second"]
    ratios = [rate / put for put in puts]
    return [f"| import {small['customers']:,} customers (one NDJSON POST; baselines: one PUT "
            f"each), customers/s | {rate:.0f} | {puts[0]:.0f} | {puts[1]:.0f} | "
            f"{ratios[0]:.1f} | {ratios[1]:.1f} | {verdict(ratios, 30, True)} |",
            f"| import {big['customers']:,} customers, s / customers/s / peak RSS MB (before "
            f"it: {big['rss_before_mb']:.0f}) | {big['seconds']:.1f} / {big['per_second']:.0f} / "
            f"{big['peak_rss_mb']:.0f} | - | - | - | - | "
            f"< 200 MB: {'met' if big['peak_rss_mb'] < 200 else 'missed'} |",
            f"| export {export['customers']:,} customers (NDJSON), s / customers/s / peak RSS MB |"
            f" {export['seconds']:.1f} / {export['customers'] / export['seconds']:.0f} / "
            f"{export['peak_rss_mb']:.0f} | - | - | - | - | |"]


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, as uptime prints them."""
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec",
                        help="the cluster's AOF fsync policy (always: as durable as MemoryDB)")
    parser.add_argument("--ids", type=int, default=10000, help="customers for GET/PUT and listing")
    parser.add_argument("--seconds", type=int, default=6, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="wrk runs of each server for each request, taking turns (medians)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--big", type=int, default=1000000, help="customers the service lists")
    parser.add_argument("--baseline-big", type=int, default=100000,
                        help="customers the rebuild lists")
    parser.add_argument("--imports", type=int, default=100000,
                        help="customers the timed NDJSON import creates")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--imports-only", action="store_true",
                      help="measure only the imports (and the baselines' PUT)")
    only.add_argument("--requests-only", action="store_true",
                      help="measure only GET, PUT, POST and the list of --ids customers")
    parser.add_argument("--original-python", default=str(ORIGINAL_PYTHON),
                        help="the Python of a venv with benchmarks/requirements-original.txt")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is missing: `make bench` installs it (apt-get install wrk)", file=sys.stderr)
        return 2
    if not Path(args.original_python).exists():
        print(f"{args.original_python} is missing: `make bench` makes that venv from "
              "benchmarks/requirements-original.txt", file=sys.stderr)
        return 2
    load_before = load_average()
    results = run(args)
    results.update(load_before=load_before, load_after=load_average())
    results["table"] = table(results)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["cpus"] = os.cpu_count()
    print(results["table"])
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    kind = ("imports" if args.imports_only else "requests" if args.requests_only
            else "bench") + f"-{args.appendfsync}"
    for name in (f"{kind}-{results['finished']}.json", f"{kind}-latest.json"):
        (out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out / f'{kind}-latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
