"""Start and control real Redis Cluster processes on loopback for tests and benchmarks."""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from embedded import free_cluster_port

SLOTS = 16384


def free_cluster_ports(count: int) -> list[int]:
    """Return distinct ports whose cluster bus ports (port + 10000) are free too."""
    ports = []
    while len(ports) < count:
        ports.append(free_cluster_port(taken=ports))
    return ports


@dataclass
class Node:
    """One redis-server process of the cluster."""

    port: int
    directory: Path
    process: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def client(self, **options) -> redis.Redis:
        """Return a plain client of this node alone."""
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5, **options)


class LocalCluster:
    """A Redis Cluster of real processes: primaries, optional replicas, AOF on every write."""

    def __init__(self, binary: str, directory, primaries: int = 3, replicas: int = 0,
                 appendfsync: str = "always", config: dict | None = None,
                 client_options: dict | None = None):
        self.binary = binary
        self.directory = Path(directory)
        self.primaries = primaries
        self.replicas = replicas
        self.appendfsync = appendfsync
        self.config = config or {}
        self.client_options = client_options or {}
        ports = free_cluster_ports(primaries * (1 + replicas))
        self.nodes = [Node(port, self.directory / str(port)) for port in ports]

    def _write_config(self, node: Node) -> Path:
        node.directory.mkdir(parents=True, exist_ok=True)
        settings = {
            "port": node.port,
            "bind": "127.0.0.1",
            "dir": node.directory,
            "logfile": "redis.log",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": 2000,
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": '""',
            **self.config,
        }
        path = node.directory / "redis.conf"
        path.write_text("".join(f"{name} {value}\n" for name, value in settings.items()))
        return path

    def start_node(self, node: Node) -> None:
        """Start (or restart) one node's process, keeping its data and cluster state."""
        config = self._write_config(node)
        node.process = subprocess.Popen([self.binary, str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with node.client(**self.client_options) as client:
                    client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if node.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {node.port} did not start; "
                                       f"see {node.directory}/redis.log") from None
                time.sleep(0.05)

    def start(self) -> "LocalCluster":
        """Start every node, join them, give the primaries the slots, and wait until ok."""
        for node in self.nodes:
            self.start_node(node)
        primaries = self.nodes[: self.primaries]
        per_node = SLOTS // self.primaries
        for index, node in enumerate(primaries):
            end = SLOTS if index == self.primaries - 1 else (index + 1) * per_node
            with node.client(**self.client_options) as client:
                client.execute_command("CLUSTER ADDSLOTS", *range(index * per_node, end))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            with node.client(**self.client_options) as client:
                client.execute_command("CLUSTER MEET", "127.0.0.1", first.port)
        self._wait(lambda info: int(info["cluster_known_nodes"]) == len(self.nodes))
        for index, node in enumerate(self.nodes[self.primaries:]):
            primary = primaries[index % self.primaries]
            with primary.client(**self.client_options) as client:
                primary_id = client.execute_command("CLUSTER MYID")
            with node.client(**self.client_options) as client:
                client.execute_command("CLUSTER REPLICATE", primary_id)
        self.wait_ok()
        return self

    def _wait(self, ready, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = []
                for node in self.nodes:
                    if node.process and node.process.poll() is None:
                        with node.client(**self.client_options) as client:
                            infos.append(client.cluster("info"))
                if infos and all(ready(info) for info in infos):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local cluster did not become ready in time")
            time.sleep(0.1)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports cluster_state:ok and knows every primary."""
        self._wait(lambda info: info["cluster_state"] == "ok"
                   and int(info["cluster_size"]) == self.primaries, timeout)

    def kill(self, node: Node, sig=signal.SIGKILL) -> None:
        """Send a signal to a node (SIGKILL by default) and wait for it to die if fatal."""
        node.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            node.process.wait(15)

    def stop(self) -> None:
        """Stop every node this cluster started."""
        for node in self.nodes:
            if node.process and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)
                node.process.terminate()
        for node in self.nodes:
            if node.process:
                try:
                    node.process.wait(15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    def flush(self) -> None:
        """Empty the database: FLUSHALL on every primary (replicas follow)."""
        for node in self.nodes:
            with node.client(**self.client_options) as client:
                if client.info("replication")["role"] == "master":
                    client.flushall()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
