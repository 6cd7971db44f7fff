"""Start and control real Redis Cluster processes on loopback for tests and benchmarks."""

import os
import random
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from embedded import SERVICE_ACCESS

SLOTS = 16384
# The service's least-privilege ACL user: the same access the embedded database gives it.
APP_ACCESS = SERVICE_ACCESS


def port_free(port: int) -> bool:
    """Tell whether a loopback TCP port can be listened on now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken=()) -> int:
    """Return a free port whose cluster bus port (the port + 10000) is free too, neither of
    them in taken."""
    while True:
        # Below the kernel's ephemeral range (32768 and up), for the bus port too: a node
        # restarted later must not find its port taken by some client's connection.
        port = random.randint(10000, 22700)
        if (port not in taken and port + 10000 not in taken and port_free(port)
                and port_free(port + 10000)):
            return port


def free_cluster_ports(count: int) -> list[int]:
    """Return ports for count nodes: no node's port is another's port or bus port."""
    ports, taken = [], set()
    while len(ports) < count:
        # Nothing listens on the chosen ones yet: port_free cannot see them, taken does.
        ports.append(free_cluster_port(taken))
        taken |= {ports[-1], ports[-1] + 10000}
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


class Security:
    """A throwaway CA and node certificate (TLS) and the ACL users of one cluster."""

    def __init__(self, directory: Path, tls: bool = True, acl: bool = True):
        import trustme

        self.directory = directory
        self.tls = tls
        self.acl = acl
        self.admin_password = secrets.token_hex(16)
        self.app_password = secrets.token_hex(16)
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.cert_file, self.key_file = directory / "node.pem", directory / "node.key"
        if tls:
            authority = trustme.CA()
            authority.cert_pem.write_to_path(str(self.ca_file))
            node = authority.issue_cert("127.0.0.1", "localhost")
            node.cert_chain_pems[0].write_to_path(str(self.cert_file))
            node.private_key_pem.write_to_path(str(self.key_file))

    def settings(self, port: int) -> dict:
        """Return the redis.conf settings for a node that listens on port."""
        settings = {}
        if self.tls:
            settings.update({
                "port": 0, "tls-port": port, "tls-cluster": "yes", "tls-replication": "yes",
                "tls-cert-file": self.cert_file, "tls-key-file": self.key_file,
                "tls-ca-cert-file": self.ca_file, "tls-auth-clients": "no",
            })
        if self.acl:
            settings.update({"masteruser": "admin", "masterauth": self.admin_password})
        return settings

    def users(self) -> str:
        """Return the ACL lines of redis.conf: default off, an admin, the service's app user."""
        if not self.acl:
            return ""
        return ("user default off\n"
                f"user admin on >{self.admin_password} ~* &* +@all\n"
                f"user app on >{self.app_password} {APP_ACCESS}\n")

    def client_options(self, user: str = "admin") -> dict:
        """Return redis-py options to connect as user ("admin" or "app")."""
        options = {}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.ca_file))
        if self.acl:
            options.update(username=user, password=getattr(self, f"{user}_password"))
        return options

    def service_env(self) -> dict:
        """Return the service's DB* variables to connect as the app user."""
        env = {"DBTLS": "true" if self.tls else "false"}
        if self.tls:
            env["DBCACERT"] = str(self.ca_file)
        if self.acl:
            env.update(DBUSERNAME="app", DBPASSWORD=self.app_password)
        return env


class LocalCluster:
    """A Redis Cluster of real processes: primaries, optional replicas, AOF on every write."""

    def __init__(self, binary: str, directory, primaries: int = 3, replicas: int = 0,
                 appendfsync: str = "always", config: dict | None = None,
                 client_options: dict | None = None, tls: bool = False, acl: bool = False):
        self.binary = binary
        self.directory = Path(directory)
        self.primaries = primaries
        self.replicas = replicas
        self.appendfsync = appendfsync
        self.config = config or {}
        self.security = Security(self.directory / "security", tls, acl) if tls or acl else None
        self.client_options = {**(self.security.client_options() if self.security else {}),
                               **(client_options or {})}
        ports = free_cluster_ports(primaries * (1 + replicas))
        self.nodes = [Node(port, self.directory / str(port)) for port in ports]
        self._admins = {}

    def admin(self, node: Node) -> redis.Redis:
        """Return a kept client of one node (a TLS handshake per call would slow tests down)."""
        if node.port not in self._admins:
            self._admins[node.port] = node.client(**self.client_options)
        return self._admins[node.port]

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
            **(self.security.settings(node.port) if self.security else {}),
            **self.config,
        }
        path = node.directory / "redis.conf"
        path.write_text("".join(f"{name} {value}\n" for name, value in settings.items())
                        + (self.security.users() if self.security else ""))
        return path

    def service_env(self) -> dict:
        """Return the environment that points the service at this cluster (as the app user)."""
        env = {"DBHOST": "127.0.0.1", "DBPORT": str(self.nodes[0].port), "DBTLS": "false"}
        return {**env, **(self.security.service_env() if self.security else {})}

    def primary_nodes(self) -> list[Node]:
        """Return the nodes that are primaries now (running ones only)."""
        primaries = []
        for node in self.nodes:
            if node.process and node.process.poll() is None:
                if self.admin(node).info("replication")["role"] == "master":
                    primaries.append(node)
        return primaries

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
        """Start every node, join them, give the primaries the slots, and wait until ok; on a
        failure, stop the nodes already started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "LocalCluster":
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
        self.wait_replicas_in_sync()
        return self

    def wait_replicas_in_sync(self, timeout: float = 30.0) -> None:
        """Wait until every running replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        for node in self.nodes[self.primaries:]:
            if node.process and node.process.poll() is None:
                while self.admin(node).info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica on port {node.port} not in sync in time")
                    time.sleep(0.1)

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

    def has_replica(self, node: Node) -> bool:
        """Tell whether node is a primary with a replica in sync."""
        replication = self.admin(node).info("replication")
        return replication["role"] == "master" and any(
            value.get("state") == "online" for name, value in replication.items()
            if name.startswith("slave") and isinstance(value, dict))

    def fail_over(self, victim: Node, successor: Node) -> tuple[float, float]:
        """Kill -9 the primary victim, wait for successor to take over, start victim again as
        its replica; return the seconds until the promotion and until the replica is in sync."""
        from mixed_load import wait_until

        killed = time.monotonic()
        self.kill(victim)
        wait_until(lambda: successor in self.primary_nodes())
        self.wait_ok()
        promoted = time.monotonic() - killed
        self.start_node(victim)
        wait_until(lambda: self.has_replica(successor))
        return promoted, time.monotonic() - killed

    def stop(self) -> None:
        """Stop every node this cluster started."""
        for client in self._admins.values():
            client.close()
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
        for node in self.primary_nodes():
            self.admin(node).flushall()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    """Run a MemoryDB-shaped cluster (3 shards of 2 nodes, TLS, ACL users) until Ctrl-C."""
    import shutil
    import tempfile
    import threading

    binary = os.environ.get("TLS_REDIS_SERVER") or shutil.which("redis-server")
    with tempfile.TemporaryDirectory(prefix="memorydb-") as directory:
        cluster = LocalCluster(binary, directory, replicas=1, tls=True, acl=True)
        stopped = threading.Event()
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stopped.set())
        with cluster:
            env = cluster.service_env()
            security = cluster.security
            print(f"MemoryDB-shaped cluster: 3 shards of 2 nodes, TLS only, on ports "
                  f"{', '.join(str(node.port) for node in cluster.nodes)}; data in {directory}")
            print("\nConnect the service (as the least-privilege app user):\n")
            print("  " + " ".join(f"{name}={value}" for name, value in env.items()) + " make run")
            print("\nOr look around as the admin user:\n")
            print(f"  redis-cli -c --tls --cacert {security.ca_file} --user admin "
                  f"--pass {security.admin_password} --no-auth-warning -p {cluster.nodes[0].port}")
            print(f"\nApp user's access string: {APP_ACCESS}\n\nCtrl-C stops the cluster.",
                  flush=True)
            while not stopped.wait(0.5):
                pass
        print("cluster stopped")


if __name__ == "__main__":
    main()
