"""With no database configured, the service runs its own durable Redis."""

import errno
import fcntl
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import redis

import embedded
from embedded import ADMIN_USER, SERVICE_USER, SOCKET, free_port
from http_client import call
from local_cluster import free_cluster_port
from service_process import SERVER, ServiceProcess

pytestmark = pytest.mark.cluster


def embedded_env(tmp_path) -> dict:
    """An environment with no database configured and data kept under tmp_path."""
    return {"DATA_DIR": str(tmp_path / "data"), "WORKERS": "1", "DBHOST": "", "DB_HOST": ""}


def embedded_client(data_dir: Path, user: str = ADMIN_USER, **options) -> redis.Redis:
    """Return a client of the embedded database keeping data_dir, as user (password from file)."""
    password = (data_dir / f"{user}.password").read_text().strip()
    return redis.Redis(unix_socket_path=str(data_dir / SOCKET), username=user,
                       password=password, socket_timeout=5, decode_responses=True, **options)


def raw_reply(address: Path | int, command: bytes) -> bytes:
    """Send one inline command to a unix socket or a loopback port, return the reply's line."""
    if isinstance(address, Path):
        connection = socket.socket(socket.AF_UNIX)
        connection.settimeout(10)
        connection.connect(str(address))
    else:
        connection = socket.create_connection(("127.0.0.1", address), timeout=10)
    with connection:
        connection.sendall(command + b"\r\n")
        return connection.makefile("rb").readline()


def listening(pid: int) -> set:
    """Return the TCP addresses a process listens on."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def connect_as_nobody(path: Path) -> str:
    """Connect to a unix socket from a process of the user nobody; return how it went."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as connection:
                connection.connect(str(path))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    return {0: "connected", 13: "permission denied"}.get(
        os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), "failed otherwise")


def restart_embedded_database(service: ServiceProcess, data_dir: Path) -> int:
    """Kill -9 the service's embedded database, wait until it serves again, return its pid."""
    with embedded_client(data_dir) as client:
        killed = int(client.info("server")["process_id"])
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while call(service.url + "/customers/restarted", "PUT", {"n": 1},
               timeout=30)[0] not in (201, 204):
        assert time.monotonic() < deadline, "the embedded database did not come back"
        time.sleep(0.1)
    with embedded_client(data_dir) as client:
        started = int(client.info("server")["process_id"])
    assert started != killed
    return started


@pytest.fixture(scope="module")
def embedded_service():
    """One service on its embedded database, started over a data directory an older one left."""
    # Not in pytest's own folder, which only its user may enter: on the way to the data
    # directory, that directory's own mode must be what keeps other users out.
    with tempfile.TemporaryDirectory(prefix="embedded-") as parent:
        Path(parent).chmod(0o755)
        data = Path(parent) / "data"
        data.mkdir(mode=0o755)
        (data / "appendonlydir").mkdir(mode=0o755)
        (data / "redis.log").write_text("an older version's log, readable by everyone\n")
        (data / "redis.log").chmod(0o644)
        (data / "appendonlydir" / "leftover").write_text("")
        (data / "appendonlydir" / "leftover").chmod(0o644)
        (data / "notes.txt").write_text("an operator's file, not the database's\n")
        (data / "notes.txt").chmod(0o644)
        with ServiceProcess(embedded_env(data.parent)) as service:
            assert call(service.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
            yield service, data


def test_a_customer_written_to_the_embedded_database_survives_a_restart(tmp_path):
    env = embedded_env(tmp_path)
    with ServiceProcess(env) as service:
        status, headers, created = call(service.url + "/customers", "POST",
                                        {"name": "Joe", "balance": 1000})
        assert status == 201
    assert service.process.returncode == 0
    assert "embedded database stopped" in service.printed
    password = (tmp_path / "data" / "service.password").read_text()

    with ServiceProcess(env) as service:
        status, _, body = call(service.url + "/customers/" + created["id"])
        assert status == 200
        assert body == created
        assert call(service.url + "/customers")[2] == [created]
    assert (tmp_path / "data" / "service.password").read_text() == password


def test_the_embedded_database_is_standalone_with_an_append_only_file(tmp_path):
    env = embedded_env(tmp_path)
    with ServiceProcess(env) as service:
        call(service.url + "/customers/1", "PUT", {"name": "Joe"})
    data = tmp_path / "data"
    config = (data / "redis.conf").read_text()
    assert "cluster-enabled no" in config
    assert "appendfsync always" in config
    assert "Joe" in "".join(path.read_text(errors="replace") for path in data.rglob("*.aof"))


def test_the_embedded_database_listens_on_no_tcp_port_and_only_its_user_reaches_its_socket(
        embedded_service):
    service, data = embedded_service
    with embedded_client(data) as client:
        pid = int(client.info("server")["process_id"])
        assert client.info("server")["tcp_port"] == 0
        # Standalone: no cluster bus, so no node can meet it or take its data.
        with pytest.raises(redis.ResponseError, match="cluster support disabled"):
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", "7000")
    assert listening(pid) == set()
    socket_path = data / SOCKET
    assert oct(socket_path.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
    # Another local user cannot even reach the socket; this one without a password gets NOAUTH.
    if os.geteuid() == 0:
        assert connect_as_nobody(socket_path) == "permission denied"
    elif os.environ.get("CI"):
        pytest.fail("run as root to test another user's connection (CI does)")
    assert raw_reply(socket_path, b"PING").startswith(b"-NOAUTH")
    assert call(service.url + "/customers/1")[2] == {"id": "1", "name": "Joe"}


def test_embedded_port_adds_a_loopback_port_that_asks_for_the_password(tmp_path):
    port = free_port()
    with ServiceProcess({**embedded_env(tmp_path), "EMBEDDED_PORT": str(port)}) as service:
        assert call(service.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
        with embedded_client(tmp_path / "data") as client:
            assert listening(int(client.info("server")["process_id"])) == {("127.0.0.1", port)}
        assert raw_reply(port, b"PING").startswith(b"-NOAUTH")
        assert raw_reply(port, b"CLUSTER MEET 127.0.0.1 7000").startswith(b"-NOAUTH")
        assert raw_reply(port, b"AUTH service wrong-password").startswith(b"-WRONGPASS")


def test_a_data_directory_of_the_former_cluster_mode_server_loads_every_customer(
        tmp_path, redis_server_binary):
    data = tmp_path / "data"
    data.mkdir()
    port = free_cluster_port()
    # How the embedded database ran before: a one-node cluster on a loopback port.
    (data / "redis.conf").write_text(
        f"port {port}\nbind 127.0.0.1\ndir {data}\ncluster-enabled yes\n"
        "cluster-config-file nodes.conf\nappendonly yes\nappendfsync always\nsave \"\"\n")
    former = subprocess.Popen([redis_server_binary, str(data / "redis.conf")],
                              stdout=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port, socket_timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "the former server did not start"
                    time.sleep(0.1)
            while client.cluster("info")["cluster_state"] != "ok":
                assert time.monotonic() < deadline, "the former cluster did not become ok"
                time.sleep(0.1)
            client.hset("customer:old1", mapping={"name": "Joe"})
            # One customer in the rewritten base file, one in the file of later writes.
            client.bgrewriteaof()
            while client.info("persistence")["aof_rewrite_in_progress"] or \
                    client.info("persistence")["aof_rewrite_scheduled"]:
                assert time.monotonic() < deadline, "the rewrite did not end"
                time.sleep(0.1)
            client.hset("customer:old2", mapping={"name": "Ann"})
    finally:
        former.kill()
        former.wait()
    assert (data / "nodes.conf").exists()

    with ServiceProcess(embedded_env(tmp_path)) as service:
        assert call(service.url + "/customers/old1")[2] == {"id": "old1", "name": "Joe"}
        assert call(service.url + "/customers/old2")[2] == {"id": "old2", "name": "Ann"}
        assert call(service.url + "/customers/new", "PUT", {"name": "Eve"})[0] == 201
        listed = call(service.url + "/customers")[2]
    assert sorted(customer["id"] for customer in listed) == ["new", "old1", "old2"]


def test_the_embedded_database_is_valkey_8_1(embedded_service):
    _, data = embedded_service
    with embedded_client(data) as client:
        assert client.info("server")["valkey_version"].startswith("8.1.")


def test_redis_server_names_another_server_run_as_closed_as_the_bundled_one(
        tmp_path, tls_redis_server_binary):
    env = {**embedded_env(tmp_path), "REDIS_SERVER": tls_redis_server_binary}
    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
        assert call(service.url + "/customers/1")[2] == {"id": "1", "name": "Joe"}
        data = tmp_path / "data"
        with embedded_client(data) as client:
            assert "valkey_version" not in client.info("server")
        assert raw_reply(data / SOCKET, b"PING").startswith(b"-NOAUTH")
        with embedded_client(data, SERVICE_USER, protocol=2) as client:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.config_get("dir")


def test_the_embedded_database_answers_noauth_to_a_client_without_the_password(
        embedded_service):
    service, data = embedded_service
    assert raw_reply(data / SOCKET, b"PING").startswith(b"-NOAUTH")
    assert raw_reply(data / SOCKET, b"CONFIG SET dir /tmp").startswith(b"-NOAUTH")
    assert raw_reply(data / SOCKET, b"AUTH default nothing").startswith(b"-WRONGPASS")
    assert raw_reply(data / SOCKET, b"AUTH service wrong-password").startswith(b"-WRONGPASS")
    assert call(service.url + "/customers/1")[2] == {"id": "1", "name": "Joe"}


@pytest.mark.parametrize("command", [
    ("CONFIG", "GET", "*"), ("CONFIG", "SET", "dir", "/tmp"), ("DEBUG", "SLEEP", "0"),
    ("MODULE", "LIST"), ("FLUSHALL",), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"),
    ("EVAL", "return 1", "0"), ("KEYS", "*"), ("CLUSTER", "RESET"), ("SET", "customer:9", "x"),
    ("HSET", "other:1", "a", "b"),
])
def test_the_services_user_is_refused_what_the_service_never_sends(embedded_service, command):
    _, data = embedded_service
    with embedded_client(data, SERVICE_USER, protocol=2) as client:
        # Refused by its ACL, or (DEBUG) for everyone: either way, never run.
        with pytest.raises(redis.ResponseError, match="(?i)no permissions|command not allowed"):
            client.execute_command(*command)
        assert client.hgetall("customer:1") == {"name": "Joe"}


@pytest.mark.parametrize(("command", "refusal"), [
    (("DEBUG", "SLEEP", "0"), "DEBUG command not allowed"),
    (("MODULE", "LOAD", "/tmp/x.so"), "MODULE command not allowed"),
    (("CONFIG", "SET", "dir", "/tmp"), "protected config"),
    (("CONFIG", "SET", "dbfilename", "x.rdb"), "protected config"),
])
def test_even_the_admin_user_cannot_debug_load_modules_or_move_files(embedded_service, command,
                                                                      refusal):
    _, data = embedded_service
    with embedded_client(data) as client:
        with pytest.raises(redis.ResponseError, match=refusal):
            client.execute_command(*command)


def test_the_data_directory_is_0700_and_every_file_in_it_0600(embedded_service):
    service, data = embedded_service
    assert call(service.url + "/customers/2", "PUT", {"name": "Ann"})[0] == 201
    modes = {str(path.relative_to(data)): oct(path.stat().st_mode & 0o777)
             for path in data.rglob("*")}
    # Another file there is the operator's: the 0700 folder guards it, its mode is its own.
    assert modes.pop("notes.txt") == "0o644"
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert {"service.password", "admin.password", "redis.conf", "redis.log", "appendonlydir",
            "socket", str(SOCKET)} <= set(modes)
    assert any(name.endswith(".aof") for name in modes)
    assert {name: mode for name, mode in modes.items()
            if mode != ("0o700" if (data / name).is_dir() else "0o600")} == {}


def test_the_passwords_are_random_kept_and_never_written_in_the_config(embedded_service):
    _, data = embedded_service
    service_password = (data / "service.password").read_text().strip()
    admin_password = (data / "admin.password").read_text().strip()
    assert len(service_password) >= 32 and len(admin_password) >= 32
    assert service_password != admin_password
    config = (data / "redis.conf").read_text()
    assert service_password not in config and admin_password not in config
    assert "user default off" in config


def test_server_py_runs_from_the_src_folder_as_in_the_original(tmp_path):
    with ServiceProcess(embedded_env(tmp_path), cwd=SERVER.parent) as service:
        assert call(service.url + "/customers")[0] == 200


def test_kept_alive_connections_beyond_the_threads_are_all_served(tmp_path):
    # The HTTP server must not give each open connection a thread (or a place it keeps
    # while idle): clients with more connections than threads would wait for ever.
    with ServiceProcess({**embedded_env(tmp_path), "THREADS": "1"}) as service:
        connections = [http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
                       for _ in range(4)]
        try:
            for _ in range(2):
                for connection in connections:
                    connection.request("GET", "/healthz")
                    response = connection.getresponse()
                    response.read()
                    assert response.status == 200
                    assert not response.will_close
        finally:
            for connection in connections:
                connection.close()


def test_the_process_environment_never_passes_for_request_headers(tmp_path):
    # granian puts the process environment in every request's environ (httpoxy's trap).
    env = {**embedded_env(tmp_path), "API_TOKENS": "s3cret-token-0123",
           "HTTP_AUTHORIZATION": "Bearer s3cret-token-0123", "HTTP_X_REQUEST_ID": "from-env"}
    with ServiceProcess(env) as service:
        status, headers, body = call(service.url + "/customers")
    assert status == 401
    assert headers["X-Request-ID"] != "from-env"


@pytest.mark.parametrize("request_bytes", [
    b"GET /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x00b\r\n\r\n",
    b"NOT A REQUEST LINE\r\n\r\n",
    b"GET /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
])
def test_a_request_the_server_cannot_parse_gets_a_400_never_an_html_page(tmp_path,
                                                                         request_bytes):
    with ServiceProcess(embedded_env(tmp_path)) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(request_bytes)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400 ")
    # The HTTP server (granian) rejects it before the app sees it, with an empty body.
    assert "text/html" not in head.lower()
    assert "content-length: 0" in head.lower().split("\r\n")
    assert body == ""


@pytest.mark.parametrize(("env", "words"), [
    ({"PORT": "abc"}, "PORT must be a whole number"),
    ({"PORT": "70000"}, "PORT must be between"),
    ({"DBHOST": "db.example", "DBCACERT": "/nonexistent/ca.pem"}, "DBCACERT names no"),
    ({"DBTLS": "maybe", "DBHOST": "db.example"}, "DBTLS must be true or false"),
    ({"DBTIMEOUT": "-1"}, "DBTIMEOUT must be above 0"),
])
def test_invalid_configuration_is_one_clear_line_and_a_failed_exit(tmp_path, env, words):
    result = subprocess.run([sys.executable, str(SERVER)], env={**embedded_env(tmp_path), **env},
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("configuration error: ")
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_data_dir_too_long_for_a_unix_socket_is_refused_at_start(tmp_path):
    env = {**embedded_env(tmp_path), "DATA_DIR": str(tmp_path / ("d" * 100))}
    result = subprocess.run([sys.executable, str(SERVER)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert "DATA_DIR is too long for a unix socket" in result.stderr


def test_a_second_service_on_the_same_data_dir_is_refused_and_every_write_is_kept(tmp_path):
    # Two `make run` in two terminals: before, the second started a second server on the same
    # append-only file and took over the socket; after a rewrite of that file and a restart,
    # a customer acknowledged by the first was gone.
    env = embedded_env(tmp_path)
    with ServiceProcess(env) as first:
        assert call(first.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
        second = subprocess.run([sys.executable, str(SERVER)],
                                env={**os.environ, **env, "PORT": str(free_port())},
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"is in use by another service (pid {first.process.pid}," in second.stderr
        assert call(first.url + "/customers/2", "PUT", {"name": "Ann"})[0] == 201
    with ServiceProcess(env) as again:
        assert [customer["id"] for customer in call(again.url + "/customers")[2]] == ["1", "2"]


def test_the_data_dir_lock_is_refused_after_a_wait_naming_its_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "LOCK_WAIT_SECONDS", 0.3)
    held = embedded.hold_lock(tmp_path / "lock")
    try:
        started = time.monotonic()
        with pytest.raises(embedded.EmbeddedError, match=f"in use by another service "
                                                         f"\\(pid {os.getpid()},"):
            embedded.hold_lock(tmp_path / "lock")
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(held)
    os.close(embedded.hold_lock(tmp_path / "lock"))  # free again once its holder let go
    # A holder that wrote something else there (another program's bytes) is named unknown.
    held = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.pwrite(held, b"\xff\xfe\n\x1b[2J not a pid", 0)
    try:
        with pytest.raises(embedded.EmbeddedError) as refused:
            embedded.hold_lock(tmp_path / "lock")
        assert "(pid unknown," in str(refused.value) and "\x1b" not in str(refused.value)
    finally:
        os.close(held)
    assert (tmp_path / "lock").stat().st_mode & 0o777 == 0o600


def test_a_data_dir_lock_that_cannot_be_taken_says_why_not_that_it_is_in_use(tmp_path,
                                                                            monkeypatch):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(embedded.EmbeddedError, match="cannot open .*lock"):
        embedded.hold_lock(tmp_path / "lock")

    def no_locks_here(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(embedded.fcntl, "flock", no_locks_here)
    with pytest.raises(embedded.EmbeddedError, match="cannot lock .*: No locks available"):
        embedded.hold_lock(tmp_path / "other-lock")


def test_a_server_that_died_is_reported_with_its_last_warning_since_it_was_ready(tmp_path):
    server = embedded.EmbeddedRedis(str(tmp_path), "valkey-server")
    (tmp_path / "redis.log").write_text(
        "7:M 30 Nov 2026 04:52:14.600 # WARNING Memory overcommit must be enabled!\n"
        "7:M 30 Nov 2026 04:52:14.617 * Ready to accept connections unix\n"
        "7:M 30 Nov 2026 04:52:14.691 # Short write while writing to the AOF file\n"
        "7:M 30 Nov 2026 04:52:14.691 # Can't recover from AOF write error. Exiting...\n"
        "8:M 30 Nov 2026 04:52:14.700 # WARNING Memory overcommit must be enabled!\n"
        "8:M 30 Nov 2026 04:52:14.701 * Ready to accept connections unix\n"
        "9:M 30 Nov 2026 04:52:14.800 # WARNING Memory overcommit must be enabled!\n")
    with open(tmp_path / "redis.log", "ab") as server_log:  # bytes that are not UTF-8
        server_log.write(b"11:M 30 Nov 2026 04:52:15.000 * Ready to accept connections\n"
                         b"11:M 30 Nov 2026 04:52:15.100 # Bad key \xff\xfe\n")
    assert server._last_warning(11) == "Bad key \ufffd\ufffd"
    assert server._last_warning(7) == "Can't recover from AOF write error. Exiting..."
    assert server._last_warning(8) == "none"  # killed with -9: it said nothing
    assert server._last_warning(9) == "none"  # it died before it was ready (no room to log)
    assert server._last_warning(10) == "none"


def test_a_start_failure_names_the_last_line_of_a_log_of_any_size(tmp_path):
    server = embedded.EmbeddedRedis(str(tmp_path), "valkey-server")
    assert server._last_log_line() == f"no log in {tmp_path}"
    with open(tmp_path / "redis.log", "wb") as server_log:  # months of a server's lines
        server_log.write(b"1:M * Ready to accept connections\n" * 500_000)
        server_log.write(b"2:M # Fatal error loading the DB: \xff. Exiting.\n")
    assert server._last_log_line() == "2:M # Fatal error loading the DB: \ufffd. Exiting."


def test_a_death_on_a_nearly_full_disk_is_reported_with_the_space_left(tmp_path, monkeypatch):
    server = embedded.EmbeddedRedis(str(tmp_path), "valkey-server")
    monkeypatch.setattr(embedded, "LOW_SPACE_BYTES", 0)
    assert server._low_space() == ""
    monkeypatch.setattr(embedded, "LOW_SPACE_BYTES", shutil.disk_usage(tmp_path).free + 1)
    assert re.fullmatch(rf"; \d+ bytes free in {re.escape(str(tmp_path))}", server._low_space())


def test_the_embedded_database_stops_cleanly_even_when_the_service_is_killed(tmp_path):
    env = embedded_env(tmp_path)
    service = ServiceProcess(env).start()
    try:
        assert call(service.url + "/customers/1", "PUT", {"name": "Joe"})[0] == 201
        # The supervisor's thread started this one: it must go with the service all the same.
        restart_embedded_database(service, tmp_path / "data")
        children = psutil.Process(service.process.pid).children()
        service.process.kill()
    finally:
        service.stop()
    # The workers and the embedded Redis go too: none is left holding the port or the data.
    assert not psutil.wait_procs(children, timeout=15)[1]
    log = tmp_path / "data" / "redis.log"
    deadline = time.monotonic() + 15
    while "ready to exit" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ready to exit" in log.read_text()

    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/1")[2] == {"id": "1", "name": "Joe"}
