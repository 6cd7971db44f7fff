"""Measure how long the embedded database is away after kill -9: until ready, until a write.

Starts the real service on its embedded database (in a temporary data directory), stores
customers, then kills the database server with SIGKILL several times. For each kill it
prints the time until a new server process answers, until /readyz says ready, and until a
PUT sent after the kill is acknowledged (the service restarts the server by itself).
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from http_client import call  # noqa: E402
from service_process import ServiceProcess  # noqa: E402
from test_embedded import embedded_client  # noqa: E402


def store(data_dir: Path, count: int) -> None:
    """Store count customers straight into the embedded database, in pipelines."""
    with embedded_client(data_dir) as client:
        for first in range(0, count, 10000):
            pipe = client.pipeline(transaction=False)
            for n in range(first, min(first + 10000, count)):
                pipe.hset(f"customer:restart{n}", mapping={"name": "Joe", "n": str(n)})
            pipe.execute()


def server_pid(data_dir: Path) -> int | None:
    """Return the pid of the server answering now, or None while none does."""
    try:
        with embedded_client(data_dir, socket_connect_timeout=1) as client:
            return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None


def one_kill(url: str, data_dir: Path, limit: float = 30.0) -> tuple[float, float, float]:
    """Kill the server; return seconds until a new one answers, /readyz is 200, a PUT is 204."""
    killed = server_pid(data_dir)
    os.kill(killed, signal.SIGKILL)
    started = time.monotonic()
    answered = ready = written = None
    while None in (answered, ready, written) and time.monotonic() - started < limit:
        if answered is None and server_pid(data_dir) not in (None, killed):
            answered = time.monotonic() - started
        if ready is None and call(url + "/readyz", timeout=10)[0] == 200:
            ready = time.monotonic() - started
        if written is None and call(url + "/customers/restart-probe", "PUT",
                                    {"at": started}, timeout=10)[0] in (201, 204):
            written = time.monotonic() - started
        time.sleep(0.01)
    if None in (answered, ready, written):
        raise SystemExit(f"the embedded database was not back within {limit} s")
    return answered, ready, written


def main() -> None:
    """Parse the arguments, run the kills and print one line per kill and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--customers", type=int, default=10000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="embedded-restart-") as directory:
        data_dir = Path(directory) / "data"
        env = {"DATA_DIR": str(data_dir), "DBHOST": "", "DB_HOST": "", "DBRETRYSECONDS": "0",
               "LOG_LEVEL": "WARNING"}
        with ServiceProcess(env) as service:
            store(data_dir, args.customers)
            print(f"kill -9 of the embedded database, {args.customers} customers stored; "
                  "seconds from the kill until:")
            print("run  server answers  /readyz ready  PUT acknowledged")
            results = []
            for run in range(1, args.runs + 1):
                results.append(one_kill(service.url, data_dir))
                print(f"{run:>3}  {results[-1][0]:>14.2f}  {results[-1][1]:>13.2f}  "
                      f"{results[-1][2]:>16.2f}", flush=True)
                time.sleep(1)
            writes = [result[2] for result in results]
            print(f"PUT acknowledged: median {statistics.median(writes):.2f} s, "
                  f"max {max(writes):.2f} s over {len(writes)} runs")


if __name__ == "__main__":
    main()
