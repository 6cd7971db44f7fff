"""Serve the app with granian: HTTP in Rust, the app in Python threads of worker processes."""

import ctypes
import errno
import gc
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.server import Server

import request_log
from connection_watch import ConnectionWatch
from deadlines import Deadlines
from worker_cpus import WorkerCpus

log = logging.getLogger(__name__)
# Connections a worker takes before it leaves new ones in the listen queue. It counts
# connections, not requests: a kept-alive or idle connection holds its place until
# IDLE_TIMEOUT, so it must stay well above the clients' connections. 512 (granian's default
# with 2 workers) let 1,025 idle connections lock every other client out.
CONNECTIONS_PER_WORKER = 4096
# Open files a worker keeps besides its clients' connections (Redis, logs, the runtime).
SPARE_FILES = 256
# hyper's read and write buffers of a connection (granian's default: 417 KB). What a slow
# reader leaves unread waits there, in the kernel (connection_watch.SEND_BUFFER_BYTES) and in
# granian's queue of four chunks; every byte of it was made for nothing if the client is cut.
HTTP_BUFFER_BYTES = 64 * 1024
# Threads a worker may have waiting on slow clients (a body arriving, a response being
# read) besides its THREADS slots: a waiting thread holds no slot and no Redis connection.
WAITING_THREADS = 256
# How long a worker may take to stop before it is sent SIGTERM again (it stops in milliseconds).
REMIND_SECONDS = 1.0


# granian gives each request the process environment besides the request's own keys (PEP 3333
# allows it): a variable named like a header would pass for one the client sent (httpoxy), and
# the secrets would sit in every request. A worker drops them once its app holds its config.
REQUEST_NAMES = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH", "REQUEST_METHOD", "SCRIPT_NAME",
                           "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "REMOTE_PORT",
                           "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"})
SECRET_NAMES = frozenset({"DBPASSWORD", "DB_PASSWORD", "API_TOKENS", "AWS_SECRET_ACCESS_KEY",
                          "AWS_SESSION_TOKEN", "METRICS_TOKEN"})


def scrub_environment(environ=os.environ) -> None:
    """Remove the variables that a request's environ must not inherit."""
    for name in list(environ):
        if name.startswith("HTTP_") or name in REQUEST_NAMES or name in SECRET_NAMES:
            del environ[name]


def pool_size(config) -> int:
    """Return the Redis connections per node a worker needs: one per thread, and spare ones."""
    return config.threads + 4


def connections_per_worker() -> int:
    """Raise the open-files limit as far as allowed; return the connections a worker takes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CONNECTIONS_PER_WORKER + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY:
        return CONNECTIONS_PER_WORKER
    return max(64, min(CONNECTIONS_PER_WORKER, soft - SPARE_FILES))


class ServeError(Exception):
    """The server could not start serving (its port taken by another program, say)."""

    @classmethod
    def at(cls, host: str, port: int, reason: str) -> "ServeError":
        """Return the error of not serving on host:port (an IPv6 address in brackets)."""
        shown = f"[{host}]" if ":" in host else host
        return cls(f"cannot serve on {shown}:{port}: {reason}")


class StoppableServer(Server):
    """granian's server whose main process takes no lock in a signal handler."""

    # granian's handlers call Event.set(), which takes the Event's lock. A signal that lands
    # while the main thread holds it (a worker's exit has just woken it) deadlocks the main
    # process for good: a signal to the whole process group (Ctrl-C in a terminal, SIGTERM
    # from systemd's default KillMode) hung `make run` about once in twenty. Here the handler
    # writes a byte to a pipe and a thread of the main process does what granian's did.

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pid = os.getpid()
        self._signals_read, self._signals_write = os.pipe()

    def startup(self, spawn_target, target_loader):
        threading.Thread(target=self.relay_signals, name="signals", daemon=True).start()
        try:
            super().startup(spawn_target, target_loader)
        except RuntimeError as error:
            # granian's own would be 75 lines of Python and Rust stack for "address in use";
            # the Rust error's text may carry its backtrace after the first line.
            reason = (str(error).strip().splitlines() or ["unknown"])[0]
            raise ServeError.at(self.bind_addr, self.bind_port, reason) from None

    def signal_handler_interrupt(self, *args, **kwargs):
        # A plain assignment, at once: a worker that stopped on the same signal must not be
        # taken for a crash and started again.
        self.interrupt_signal = True
        self._relay(b"i")

    def signal_handler_reload(self, *args, **kwargs):
        self._relay(b"r")

    def _relay(self, what: bytes) -> None:
        # A worker runs this handler only until it sets its own; its signal is not ours.
        if os.getpid() == self.pid:
            os.write(self._signals_write, what)

    def relay_signals(self) -> None:
        """Wake granian's main loop for each signal the handlers noted, outside them."""
        while True:
            for what in os.read(self._signals_read, 64):
                if what == ord("r"):
                    self.reload_signal = True
                self.main_loop_interrupt.set()

    def shutdown(self, exit_code=0):
        """Stop the workers; a stop that was asked for ends with 0 though workers stopped first."""
        stopped = threading.Event()
        threading.Thread(target=self.remind_workers, args=(stopped,), name="stop-workers",
                         daemon=True).start()
        try:
            super().shutdown(exit_code)
        except SystemExit:
            # granian exits with 1 when a worker stopped before it was told to, which every
            # worker may do when the signal went to the whole group.
            if exit_code or not self.interrupt_signal:
                raise
        finally:
            stopped.set()

    def remind_workers(self, stopped: threading.Event) -> None:
        """Send SIGTERM again, every REMIND_SECONDS, to the workers still running."""
        # A granian worker can miss a stop signal that lands as it starts serving (4 of 20
        # Ctrl-C's sent just after the first answer): it would run on until workers_kill_timeout
        # and be killed. A later SIGTERM stops it, as the first one stops the others.
        while not stopped.wait(REMIND_SECONDS):
            for worker in list(self.wrks):
                if worker.is_alive():
                    worker.terminate()


def check_port(host: str, port: int) -> None:
    """Raise ServeError when another program, another service included, listens on the port."""
    # granian listens with SO_REUSEPORT: a second service on the same port would start without
    # a word, and Linux would share the clients out between the two (an old version and a new
    # one, or two embedded databases). A socket without it cannot bind beside a listener.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections wait
        try:
            probe.bind((host, port))
        except OSError as error:
            hint = " (another program, or another copy of this service, listens there)" \
                if error.errno == errno.EADDRINUSE else ""
            raise ServeError.at(host, port, f"{error.strerror}{hint}") from None


def _worker_app(factory, parent: int, config, cpus: WorkerCpus | None):
    """Build the app in a worker, which is sent SIGTERM when the main process dies (kill -9),
    on a CPU of its own when cpus are given."""
    # Until granian sets the worker's own handlers, a stop signal ends it: the main process's
    # handlers, inherited by the fork, would swallow it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the main process died before that line
        sys.exit(1)
    if cpus:
        cpus.pin_this_worker()  # before any thread starts: each inherits the CPU
    # The modules' objects live as long as the worker: the collector's full passes, which hold
    # the GIL and so stop every request of the worker, no longer walk them (28 to 41 ms, 3 ms
    # frozen). What the app builds stays collectable: a client dropped after a failover is
    # garbage in reference cycles, which frozen would never be freed.
    gc.collect()
    gc.freeze()
    app = factory()
    scrub_environment()
    ConnectionWatch(config.port, config.idle_timeout, config.min_send_rate).start()
    return Deadlines(app, config)


def serve(factory, config) -> None:
    """Serve the app built by factory until SIGTERM or SIGINT, then drain and return."""
    if config.idle_timeout <= config.db_retry_seconds + config.db_timeout:
        # A request waiting on the database moves no byte on its connection.
        log.warning("IDLE_TIMEOUT (%s s) is not above DBRETRYSECONDS + DBTIMEOUT (%s s): a "
                    "request waiting that long on the database is cut off as idle",
                    config.idle_timeout, config.db_retry_seconds + config.db_timeout)
    # The workers are forked so that each builds its own app and connections from factory,
    # which need not be picklable (Python 3.14 would otherwise start them another way).
    multiprocessing.set_start_method("fork", force=True)
    parent = os.getpid()
    cpus = WorkerCpus.for_workers(config.workers, config.pin_workers)
    StoppableServer(
        "customers-service",
        address=config.host,
        port=config.port,
        interface=Interfaces.WSGI,
        http=HTTPModes.http1,
        websockets=False,
        workers=config.workers,
        blocking_threads=config.threads + WAITING_THREADS,
        backpressure=connections_per_worker(),
        # Headers not complete within IDLE_TIMEOUT: the connection is closed (granian's own).
        # A connection's buffers, headers included, at most HTTP_BUFFER_BYTES (see above).
        http1_settings=HTTP1Settings(header_read_timeout=int(config.idle_timeout * 1000),
                                     max_buffer_size=HTTP_BUFFER_BYTES),
        respawn_failed_workers=True,
        workers_kill_timeout=20,
        log_level=config.log_level.lower(),
        log_dictconfig=request_log.granian_settings(config.log_level, config.log_format),
        metrics_enabled=bool(config.granian_metrics_port),
        metrics_address=config.host,
        metrics_port=config.granian_metrics_port or 9090,
    ).serve(target_loader=lambda _target: _worker_app(factory, parent, config, cpus))
