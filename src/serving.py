"""Serve the app with granian: HTTP in Rust, the app in Python threads of worker processes."""

import ctypes
import multiprocessing
import os
import signal
import sys

from granian.constants import HTTPModes, Interfaces
from granian.server import Server

import request_log

# Connections a worker takes before it leaves new ones in the listen queue. It counts
# connections, not requests: a kept-alive connection holds its place while it is idle, so
# it must stay well above the clients' connections (granian's own default: 1024 / workers).
CONNECTIONS_PER_WORKER = 512


# granian gives each request the process environment besides the request's own keys (PEP 3333
# allows it): a variable named like a header would pass for one the client sent (httpoxy), and
# the secrets would sit in every request. A worker drops them once its app holds its config.
REQUEST_NAMES = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH", "REQUEST_METHOD", "SCRIPT_NAME",
                           "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "REMOTE_PORT",
                           "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"})
SECRET_NAMES = frozenset({"DBPASSWORD", "DB_PASSWORD", "API_TOKENS", "METRICS_TOKEN"})


def scrub_environment(environ=os.environ) -> None:
    """Remove the variables that a request's environ must not inherit."""
    for name in list(environ):
        if name.startswith("HTTP_") or name in REQUEST_NAMES or name in SECRET_NAMES:
            del environ[name]


def pool_size(config) -> int:
    """Return the Redis connections per node a worker needs: one per thread, and spare ones."""
    return config.threads + 4


def _worker_app(factory, parent: int):
    """Build the app in a worker, which is sent SIGTERM when the main process dies (kill -9)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the main process died before that line
        sys.exit(1)
    app = factory()
    scrub_environment()
    return app


def serve(factory, config) -> None:
    """Serve the app built by factory until SIGTERM or SIGINT, then drain and return."""
    # The workers are forked so that each builds its own app and connections from factory,
    # which need not be picklable (Python 3.14 would otherwise start them another way).
    multiprocessing.set_start_method("fork", force=True)
    parent = os.getpid()
    Server(
        "customers-service",
        address=config.host,
        port=config.port,
        interface=Interfaces.WSGI,
        http=HTTPModes.http1,
        websockets=False,
        workers=config.workers,
        blocking_threads=config.threads,
        backpressure=CONNECTIONS_PER_WORKER,
        respawn_failed_workers=True,
        workers_kill_timeout=20,
        log_level=config.log_level.lower(),
        log_dictconfig=request_log.granian_settings(config.log_level, config.log_format),
        metrics_enabled=bool(config.granian_metrics_port),
        metrics_address=config.host,
        metrics_port=config.granian_metrics_port or 9090,
    ).serve(target_loader=lambda _target: _worker_app(factory, parent))
