"""Benchmark the service against the original's algorithm and serving, in one run.

Starts a local 3-primary Redis Cluster (AOF with appendfsync everysec, not always: the
figures are about the service, not the disk), loads customers, then measures both services
with wrk from a separate process, the same connections and duration for both.
"""

import argparse
import http.client
import json
import os
import shutil
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


def run(args) -> dict:
    """Measure both services on one cluster and return the figures."""
    results = {"service": {}, "baseline": {}, "settings": vars(args)}
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory, appendfsync="everysec") as cluster:
        client = cluster.nodes[0].client()
        from redis.cluster import RedisCluster
        db = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
        client.close()
        load(db, 0, args.ids)
        env = {"DBHOST": "127.0.0.1", "DBPORT": str(cluster.nodes[0].port), "DBTLS": "false",
               "LOG_LEVEL": "WARNING"}
        service = ServiceProcess(env, cwd=directory).start()
        port = free_port()
        baseline = subprocess.Popen([sys.executable, str(HERE / "baseline.py"), str(port)],
                                    env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        targets = {"service": service.url, "baseline": f"http://127.0.0.1:{port}"}
        try:
            wait_http(targets["baseline"], baseline)
            if not args.imports_only:
                print(f"listing {args.ids} with both, in turns", flush=True)
                for name, listed in median_lists(targets, args.ids).items():
                    results[name]["list_small"] = listed
            for mode in ("put",) if args.imports_only else ("get", "put", "post"):
                for name, url in targets.items():
                    print(f"{mode.upper()} on the {name} for {args.seconds}s", flush=True)
                    results[name][mode] = wrk(url, mode, args.ids, args.seconds,
                                              args.connections)
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
                print(f"listing {stored(db)} with the baseline", flush=True)
                results["baseline"]["list_big"] = {
                    "customers": stored(db),
                    **list_all(targets["baseline"], stored(db), baseline.pid, exact=False)}
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
            baseline.terminate()
            baseline.wait(30)
            service.stop()
            db.close()
    return results


def table(results: dict) -> str:
    """Format the figures and their ratios to the baseline as a Markdown table."""
    ours, base = results["service"], results["baseline"]
    rows = []
    for mode in ("get", "put", "post"):
        label = {"get": "GET /customers/<id>", "put": "PUT /customers/<id>",
                 "post": "POST /customers"}[mode]
        rows.append((f"{label} requests/s", ours[mode]["rps"], base[mode]["rps"],
                     ours[mode]["rps"] / base[mode]["rps"], "{:.0f}"))
        for pct in ("p50", "p99"):
            key = f"{pct}_ms"
            rows.append((f"{label} {pct} ms", ours[mode][key], base[mode][key],
                         ours[mode][key] / base[mode][key], "{:.1f}"))
    small, base_small = ours["list_small"]["seconds"], base["list_small"]["seconds"]
    rows.append((f"list {results['settings']['ids']:,} customers, s", small, base_small,
                 small / base_small, "{:.3f}"))
    big, base_big = ours["list_big"], base["list_big"]
    rows.append((f"peak RSS listing (service {big['customers']:,}, baseline "
                 f"{base_big['customers']:,}), MB", big["peak_rss_mb"], base_big["peak_rss_mb"],
                 big["peak_rss_mb"] / base_big["peak_rss_mb"], "{:.0f}"))
    rows.append((f"list (service {big['customers']:,}, baseline {base_big['customers']:,}), s",
                 big["seconds"], base_big["seconds"], big["seconds"] / base_big["seconds"],
                 "{:.1f}"))
    rows.append(("customers in that list (duplicates from SCAN)", big["listed"],
                 base_big["listed"], big["listed"] / base_big["listed"], "{:,}"))
    rows.append(("first byte of that list, s", big["first_byte_seconds"],
                 base_big["first_byte_seconds"],
                 big["first_byte_seconds"] / base_big["first_byte_seconds"], "{:.3f}"))
    return "\n".join(table_lines(rows) + import_lines(results))


def table_lines(rows: list) -> list:
    """Return the Markdown lines of a table of rows."""
    lines = ["| figure | service | baseline | service / baseline |", "| --- | ---: | ---: | ---: |"]
    for label, mine, theirs, ratio, fmt in rows:
        lines.append(f"| {label} | {fmt.format(mine)} | {fmt.format(theirs)} | {ratio:.2f} |")
    return lines


def import_lines(results: dict) -> list:
    """Return the table's lines on NDJSON imports: against one PUT a customer (the original's
    way, wrk's rate), and the service's peak RSS importing the big list."""
    ours, put = results["service"], results["baseline"]["put"]["rps"]
    small, big, export = ours["import"], ours["import_big"], ours["export_big"]
    return [f"| import {small['customers']:,} customers (one NDJSON POST; baseline: one PUT "
            f"each), customers/s | {small['per_second']:.0f} | {put:.0f} | "
            f"{small['per_second'] / put:.1f} |",
            f"| import {big['customers']:,} customers, s / customers/s / peak RSS MB (before "
            f"it: {big['rss_before_mb']:.0f}) | {big['seconds']:.1f} / {big['per_second']:.0f} / "
            f"{big['peak_rss_mb']:.0f} | - | - |",
            f"| export {export['customers']:,} customers (NDJSON), s / customers/s / peak RSS MB |"
            f" {export['seconds']:.1f} / {export['customers'] / export['seconds']:.0f} / "
            f"{export['peak_rss_mb']:.0f} | - | - |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10000, help="customers for GET/PUT and listing")
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--big", type=int, default=1000000, help="customers the service lists")
    parser.add_argument("--baseline-big", type=int, default=100000,
                        help="customers the baseline lists")
    parser.add_argument("--imports", type=int, default=100000,
                        help="customers the timed NDJSON import creates")
    parser.add_argument("--imports-only", action="store_true",
                        help="measure only the imports (and the baseline's PUT)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is missing: `make bench` installs it (apt-get install wrk)", file=sys.stderr)
        return 2
    results = run(args)
    results["table"] = ("\n".join(table_lines([]) + import_lines(results)) if args.imports_only
                        else table(results))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["cpus"] = os.cpu_count()
    print(results["table"])
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    kind = "imports" if args.imports_only else "bench"
    latest = "imports-latest.json" if args.imports_only else "latest.json"
    for name in (f"{kind}-{results['finished']}.json", latest):
        (out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out / latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
