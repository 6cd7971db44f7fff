"""Account for where a POST /customers spends its time, by default under appendfsync always.

Starts a local 3-primary Redis Cluster and the service, then for each THREADS setting runs
wrk's POSTs twice. The first run measures requests/s, latency, the CPU time of the
service's processes and of the redis-servers (psutil, before and after) and the context
switches of the service's threads, each divided by the requests, wrk's CPU and the machine's
idle time, and the round trip of an HSET sent every 5 ms by a client of its own.
The second samples every thread of each worker with py-spy (--nonblocking, so the workers
are not paused) and sorts the request threads' samples by where they stand: waiting
for one of the worker's THREADS slots, waiting on Redis (in redis-py's socket read), or in
the app; the app's samples split into on a CPU or not (then mostly waiting for the GIL) by a
second py-spy that records only running threads. Also times a small append and fsync in the
cluster's directory, which is what every write waits for under `always`.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests"), str(HERE)]

from bench import load_average, wrk  # noqa: E402
from idempotency_cost import cpu_seconds  # noqa: E402

from embedded import find_redis_server  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

PY_SPY = Path(sys.executable).with_name("py-spy")
# Where a request thread's innermost frames put it (py-spy's raw lines, "func (file:line)"),
# by the names of deadlines.py and of redis-py 8 with hiredis: a rename shows as no samples.
WAITING_FOR_SLOT = "Slots.__enter__ (deadlines.py"
WAITING_ON_REDIS = ("read_from_socket (redis/", "_socket_can_read (redis/", "recv_into")
REQUEST_THREAD = "_runner (granian/wsgi.py"
STATES = {"slot": "waiting for a slot", "redis": "waiting on Redis (socket read)",
          "running": "in the app, on a CPU", "other": "in the app, not on a CPU (the GIL)"}


def switches(pid: int) -> int:
    """Return the context switches of every thread of a process and its children (Linux)."""
    process = psutil.Process(pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        for status in Path(f"/proc/{member.pid}/task").glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:  # a thread that ended meanwhile
                continue
            total += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return total


def fsync_ms(directory: Path, count: int = 200) -> float:
    """Return the median time of appending a small record to a file and fsyncing it, in ms."""
    times = []
    path = directory / "fsync-probe"
    with open(path, "ab") as probe:
        for _ in range(count):
            started = time.perf_counter()
            probe.write(b"*4\r\n$4\r\nHSET\r\n" + b"x" * 150 + b"\r\n")
            probe.flush()
            os.fsync(probe.fileno())
            times.append(time.perf_counter() - started)
    path.unlink()
    return statistics.median(times) * 1000


class Probe:
    """Time HSETs from a client of its own while the load runs: the database's reply time."""

    def __init__(self, port: int):
        from redis.cluster import RedisCluster

        self.client = RedisCluster(host="127.0.0.1", port=port)
        self.times = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        number = 0
        while not self._stop.wait(0.005) and number < 100000:
            number += 1
            started = time.perf_counter()
            self.client.hset(f"probe:{number % 64}", mapping={"name": "Joe", "n": number})
            self.times.append(time.perf_counter() - started)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def percentile(self, share: float) -> float:
        """Return a percentile of the round trips, in ms."""
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000


def states(raw: str) -> dict:
    """Count a py-spy raw file's samples of request threads by state (running not told apart)."""
    counts = dict.fromkeys(STATES, 0)
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if REQUEST_THREAD not in stack:
            continue
        leaf = stack.rsplit(";", 2)
        if any(WAITING_FOR_SLOT in frame for frame in leaf[-1:]):
            counts["slot"] += int(number)
        elif any(marker in frame for frame in leaf[-2:] for marker in WAITING_ON_REDIS):
            counts["redis"] += int(number)
        else:
            counts["other"] += int(number)
    return counts


def sample_workers(workers: list, seconds: int, rate: int, directory: Path) -> list:
    """Start py-spy on each worker, all threads and running threads only; return the runs."""
    spies = []
    for worker in workers:
        for idle in (True, False):
            output = directory / f"{worker}-{'all' if idle else 'running'}.txt"
            command = [str(PY_SPY), "record", "--pid", str(worker), "--nonblocking",
                       "--rate", str(rate), "--duration", str(seconds), "--format", "raw",
                       "--output", str(output), *(["--idle"] if idle else [])]
            spies.append((subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True), output, idle))
    return spies


def collect(spies: list, seconds: int, rate: int) -> dict:
    """Wait for the py-spy runs; return each state's average number of request threads."""
    totals = {"all": dict.fromkeys(STATES, 0), "running": dict.fromkeys(STATES, 0)}
    for spy, output, idle in spies:
        _, errors = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not output.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {errors.strip()}")
        for state, count in states(output.read_text()).items():
            totals["all" if idle else "running"][state] += count
    workers = len(spies) // 2
    threads = {state: count / (seconds * rate * workers)
               for state, count in totals["all"].items()}
    # Running samples in the app; the rest of the app's samples waited (on the GIL, mostly).
    threads["running"] = totals["running"]["other"] / (seconds * rate * workers)
    threads["other"] = max(0.0, threads["other"] - threads["running"])
    return threads


def measure(service, cluster, threads: int, args, directory: Path) -> dict:
    """Return one THREADS setting's figures: a plain wrk run, then one sampled by py-spy."""
    redis_pids = [node.process.pid for node in cluster.nodes]
    wrk(service.url, "post", 1, 2, args.connections)  # warm-up: connections to every node
    before = cpu_seconds([service.process.pid]), cpu_seconds(redis_pids)
    switched = switches(service.process.pid)
    # wrk's CPU: it is this process's child, counted once it has exited.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = psutil.cpu_times()
    with Probe(cluster.nodes[0].port) as probe:
        result = wrk(service.url, "post", 1, args.seconds, args.connections)
    machine_after, children_after = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime - children.ru_utime
               - children.ru_stime)
    result["wrk_cores"] = wrk_cpu / result["seconds"]
    idle = (machine_after.idle + machine_after.iowait - machine.idle - machine.iowait)
    result["machine_idle_cores"] = idle / result["seconds"]
    result["probe_ms"] = {"p50": probe.percentile(0.5), "p90": probe.percentile(0.9),
                          "count": len(probe.times)}
    result["service_cpu_ms"] = ((cpu_seconds([service.process.pid]) - before[0]) * 1000
                                / result["requests"])
    result["switches"] = (switches(service.process.pid) - switched) / result["requests"]
    result["redis_cpu_ms"] = (cpu_seconds(redis_pids) - before[1]) * 1000 / result["requests"]
    result["service_cores"] = result["service_cpu_ms"] * result["rps"] / 1000
    result["redis_cores"] = result["redis_cpu_ms"] * result["rps"] / 1000
    result["wall_ms"] = args.connections / result["rps"] * 1000  # Little's law
    workers = [child.pid for child in psutil.Process(service.process.pid).children()]
    # The load runs a second before and after the sampling, so that every sample is under it.
    sampled = {}
    load = threading.Thread(target=lambda: sampled.update(
        wrk(service.url, "post", 1, args.seconds + 2, args.connections)))
    load.start()
    time.sleep(1)
    spies = sample_workers(workers, args.seconds, args.rate, directory)
    result["threads"] = collect(spies, args.seconds, args.rate)
    load.join(args.seconds + 120)
    result["sampled_rps"] = sampled["rps"]
    result["workers"] = len(workers)
    result["threads_setting"] = threads
    return result


def account(result: dict, connections: int, fsync: float) -> str:
    """Return the account of one THREADS setting as Markdown lines."""
    slots = result["workers"] * result["threads_setting"]
    cpu = result["service_cpu_ms"] + result["redis_cpu_ms"]
    others = (os.cpu_count() - result["machine_idle_cores"] - result["service_cores"]
              - result["redis_cores"] - result["wrk_cores"])
    threads = result["threads"]
    in_app = threads["redis"] + threads["running"] + threads["other"]
    lines = [
        f"THREADS={result['threads_setting']} ({result['workers']} workers, {slots} slots; "
        f"wrk {connections} connections): {result['rps']:.0f} requests/s, p50 "
        f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| CPU a request: service's processes, ms | {result['service_cpu_ms']:.3f} |",
        f"| CPU a request: redis-servers, ms | {result['redis_cpu_ms']:.3f} |",
        f"| context switches of the service's threads a request | {result['switches']:.1f} |",
        f"| cores busy: service / redis-servers / wrk | {result['service_cores']:.2f} / "
        f"{result['redis_cores']:.2f} / {result['wrk_cores']:.2f} |",
        f"| cores idle, whole machine (of {os.cpu_count()}) / busy with other processes | "
        f"{result['machine_idle_cores']:.2f} / {others:.2f} |",
        f"| wall time a request at {connections} in flight (Little's law), ms | "
        f"{result['wall_ms']:.2f} |",
        f"| CPU of a request / its wall time | {cpu / result['wall_ms']:.2f} |",
        f"| fsync of a small append in the cluster's directory (median), ms | {fsync:.2f} |",
        f"| an HSET's round trip from a client of its own during the load, p50 / p90 ms | "
        f"{result['probe_ms']['p50']:.2f} / {result['probe_ms']['p90']:.2f} |",
        f"| time a request holds a slot (slots in the app / requests/s), ms | "
        f"{in_app * result['workers'] / result['sampled_rps'] * 1000:.2f} |",
    ]
    for state, label in STATES.items():
        lines.append(f"| request threads of a worker {label} (average) | "
                     f"{threads[state]:.2f} |")
    if in_app:
        lines.append(f"| share of a slot's time waiting on Redis | "
                     f"{threads['redis'] / in_app:.0%} |")
    lines.append(f"| requests/s while sampled (py-spy's cost) | {result['sampled_rps']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="always")
    parser.add_argument("--threads", default="4,8",
                        help="THREADS settings of the service to measure, comma-separated")
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples a second")
    args = parser.parse_args()
    if not shutil.which("wrk") or not PY_SPY.exists():
        print("wrk or py-spy is missing: `make bench` installs both", file=sys.stderr)
        return 2
    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory() as directory, \
            LocalCluster(find_redis_server(None), directory,
                         appendfsync=args.appendfsync) as cluster:
        fsync = fsync_ms(Path(directory))
        for threads in [int(setting) for setting in args.threads.split(",")]:
            env = {**cluster.service_env(), "LOG_LEVEL": "WARNING", "THREADS": str(threads)}
            print(f"POST, appendfsync {args.appendfsync}, THREADS={threads}", flush=True)
            with ServiceProcess(env, cwd=directory) as service:
                results.append(measure(service, cluster, threads, args, Path(directory)))
    print(f"\nappendfsync {args.appendfsync}; load average before / after: {load_before} / "
          f"{load_average()}\n")
    print("\n\n".join(account(result, args.connections, fsync) for result in results))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"post-time-{args.appendfsync}-latest.json").write_text(json.dumps(
        {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "settings": vars(args), "fsync_ms": fsync, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
