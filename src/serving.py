"""Serve the app with granian: HTTP in Rust, the WSGI app on a few Python threads per worker."""

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server import Server


def pool_size(config) -> int:
    """Return the Redis connections per node a worker needs: one per thread, and spare ones."""
    return config.threads + 4


def serve(factory, config) -> None:
    """Serve the app built by factory until SIGTERM or SIGINT, then drain and return."""
    server = Server(
        "customers",
        address=config.host,
        port=config.port,
        interface=Interfaces.WSGI,
        workers=config.workers,
        blocking_threads=config.threads,
        # Requests past this wait in the socket rather than on the interpreter.
        backpressure=config.threads,
        log_level=LogLevels(config.log_level.lower()),
        workers_kill_timeout=20,
    )
    # Each worker process builds its own app (and Redis connections) once started.
    server.serve(target_loader=lambda _target: factory())
