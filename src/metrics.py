"""Prometheus metrics at GET /metrics, summed over every worker process of the service.

prometheus_client keeps a process's values in memory unless PROMETHEUS_MULTIPROC_DIR is set
when it is first imported; then each process writes its values to files of its own there
(named by its pid), and a scrape adds up the files of every process, dead ones included, so
that a counter never goes down when granian replaces a worker. The main process therefore
makes the directory fresh before it starts the database and the workers (shared_directory),
and only then imports prometheus_client: this module imports it in Metrics(), not at its top.
A gauge of live things (lists being streamed) counts the processes still running: a scrape
first drops the gauge files of processes that have died.
"""

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from flask import Response, request

from worker_cpus import service_process

log = logging.getLogger(__name__)
DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
# Latencies from 1 ms to 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Any other method a client sends is counted as "other": labels must stay few.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
STARTED = "customers.metrics.started"
# The directory the main process makes, named by its pid: a later start removes it if that
# process was killed before it could.
PREFIX = "customers-metrics-"


class Metrics:
    """The service's metrics in this process."""

    def __init__(self):
        # Only now: see the module's docstring.
        import prometheus_client as prom
        from prometheus_client import multiprocess

        self.prom, self.multiprocess = prom, multiprocess
        # Without the files of several processes, each counter would also get a _created
        # series: the output is the same whether or not the service runs several workers.
        prom.disable_created_metrics()
        self.directory = os.environ.get(DIRECTORY)
        self.registry = prom.CollectorRegistry()
        registry = self.registry
        self.requests = prom.Counter(
            "customers_requests", "HTTP requests answered, by method, URL rule and status.",
            ["method", "route", "status"], registry=registry)
        self.duration = prom.Histogram(
            "customers_request_duration_seconds",
            "Time from a request's arrival in the app to its response (a streamed list's first "
            "batch), by method and URL rule.", ["method", "route"], buckets=BUCKETS,
            registry=registry)
        self.unavailable = prom.Counter(
            "customers_unavailable_responses", "503 answers (database unavailable, not ready), "
            "by URL rule.", ["route"], registry=registry)
        self.database_errors = prom.Counter(
            "customers_database_errors", "Database calls that failed, retried ones included, "
            "by kind of error.", ["kind"], registry=registry)
        self.retried = prom.Counter(
            "customers_database_operations_retried", "Operations run again after a brief "
            "database failure (once per operation, however many attempts).", registry=registry)
        self.streams = prom.Gauge(
            "customers_streamed_lists_in_progress", "Lists of every customer being streamed now.",
            multiprocess_mode="livesum", registry=registry)
        self.embedded_up = prom.Gauge(
            "customers_embedded_database_up", "1 while the embedded database runs, else 0 "
            "(always 0 with DBHOST set).", multiprocess_mode="livemax", registry=registry)
        self._children = {}

    def timed(self, wsgi_app):
        """Wrap the app's WSGI callable to note when each request arrives."""
        def timed_app(environ, start_response):
            environ[STARTED] = time.perf_counter()
            return wsgi_app(environ, start_response)
        return timed_app

    def count(self, response: Response) -> Response:
        """Count a request's answer and observe its duration."""
        # One look through Flask's request proxy, not one for each attribute: it is per request.
        current = request._get_current_object()
        rule = current.url_rule
        route = rule.rule if rule is not None else UNMATCHED
        method = current.method if current.method in METHODS else "other"
        status = response.status_code
        key = (method, route, status)
        # Labelled children are kept: finding them again by labels costs more than counting.
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(method, route, str(status)),
                                              self.duration.labels(method, route))
        counter, histogram = children
        counter.inc()
        started = current.environ.get(STARTED)
        if started is not None:
            histogram.observe(time.perf_counter() - started)
        if status == 503:
            self.unavailable.labels(route).inc()
        if response.is_streamed and response.mimetype == "application/json":
            self.streams.inc()
            response.call_on_close(self.streams.dec)
        return response

    def scrape(self) -> Response:
        """Answer GET /metrics: every process's metrics, in the format the scraper asks for."""
        registry = self.registry
        if self.directory:
            forget_dead_processes(self.directory)
            registry = self.prom.CollectorRegistry()
            self.multiprocess.MultiProcessCollector(registry, self.directory)
        return Response.from_app(self.prom.make_wsgi_app(registry), request.environ)


_metrics: Metrics | None = None


def start() -> Metrics:
    """Return this process's metrics, made at the first call."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def forget_dead_processes(directory: str) -> None:
    """Drop the live gauges' files of processes that have ended (a worker granian replaced)."""
    if not Path("/proc/self/stat").exists():
        return
    parent = os.getppid()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not service_process(pid, parent):
            start().multiprocess.mark_process_dead(pid, directory)


def remove_orphans(parent: Path) -> None:
    """Remove the directories that main processes killed with SIGKILL left behind in parent."""
    if not Path("/proc/self").exists():
        return
    for orphan in parent.glob(PREFIX + "*"):
        pid = orphan.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(orphan, ignore_errors=True)


@contextlib.contextmanager
def shared_directory(enabled: bool = True):
    """In the main process, before the workers start: let every process count into one place.

    PROMETHEUS_MULTIPROC_DIR, when set, is emptied of earlier runs' files; else a fresh
    temporary directory is used (in /dev/shm when there is one) and removed at the end.
    """
    if not enabled:
        yield
        return
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    given = os.environ.get(DIRECTORY)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        directory = given
    else:
        # In memory where there is a tmpfs: the files are written at every request.
        parent = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        remove_orphans(parent)
        directory = os.environ[DIRECTORY] = tempfile.mkdtemp(
            prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
    start()
    log.info("metrics of every worker kept in %s", directory)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


def install(app) -> None:
    """Count every request of the app and serve GET /metrics."""
    metrics = start()
    if metrics.directory:
        # A new worker may have the pid of a dead one: its live gauges must start from zero.
        metrics.multiprocess.mark_process_dead(os.getpid(), metrics.directory)
    # Timed from the WSGI call, so that Flask's own work and a refused token count too.
    app.wsgi_app = metrics.timed(app.wsgi_app)
    app.after_request(metrics.count)
    app.add_url_rule("/metrics", "metrics", metrics.scrape)


def database_error(error: Exception) -> None:
    """Count a failed database call, by the kind of its error."""
    if _metrics is not None:
        # A database that refuses (database.Refusing) is counted by why: "Refusing OOM".
        code = getattr(error, "code", None)
        kind = type(error).__name__ + (f" {code}" if isinstance(code, str) else "")
        _metrics.database_errors.labels(kind).inc()


def operation_retried() -> None:
    """Count an operation run again after a brief database failure."""
    if _metrics is not None:
        _metrics.retried.inc()


def set_embedded_up(up: bool) -> None:
    """Record whether the embedded database runs (called by the main process)."""
    if _metrics is not None:
        _metrics.embedded_up.set(1 if up else 0)
