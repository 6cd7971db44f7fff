"""Serve the app with gunicorn's threaded workers."""

import json

from gunicorn import util
from gunicorn.app.base import BaseApplication

import request_log


def write_json_error(sock, status: int, reason: str, message: str) -> None:
    """Answer a request gunicorn could not parse with the service's JSON error shape."""
    body = json.dumps({"message": f"{reason}: {message}" if message else reason}) + "\n"
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, (head + body).encode("latin-1"))


# gunicorn answers a request that never reaches the app (a malformed request line or
# header) with an HTML page of its own; the service's clients get JSON for everything.
util.write_error = write_json_error


class Server(BaseApplication):
    """Gunicorn, configured from our settings rather than its command line."""

    def __init__(self, factory, options: dict):
        self.factory = factory
        self.options = options
        super().__init__()

    def load_config(self):
        """Apply the options to gunicorn's settings."""
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self):
        """Build the app inside each worker, after the fork, so each has its own connections."""
        return self.factory()


def pool_size(config) -> int:
    """Return the Redis connections per node a worker needs: one per thread, and spare ones."""
    return config.threads + 4


def serve(factory, config) -> None:
    """Serve the app built by factory until SIGTERM or SIGINT, then drain and return."""
    Server(factory, {
        "bind": f"{config.host}:{config.port}",
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": "gthread",
        "graceful_timeout": 20,
        "timeout": 60,
        "loglevel": config.log_level.lower(),
        "control_socket_disable": True,
        **request_log.gunicorn_settings(config.log_level, config.log_format),
    }).run()
