"""With no database configured, the service runs its own durable Redis."""

import http.client
import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from http_client import call
from service_process import SERVER, ServiceProcess

pytestmark = pytest.mark.cluster


def embedded_env(tmp_path) -> dict:
    """An environment with no database configured and data kept under tmp_path."""
    return {"DATA_DIR": str(tmp_path / "data"), "WORKERS": "1", "DBHOST": "", "DB_HOST": ""}


def test_a_customer_written_to_the_embedded_database_survives_a_restart(tmp_path):
    env = embedded_env(tmp_path)
    with ServiceProcess(env) as service:
        status, headers, created = call(service.url + "/customers", "POST",
                                        {"name": "Joe", "balance": 1000})
        assert status == 201
    assert service.process.returncode == 0
    assert "embedded Redis stopped" in service.printed

    with ServiceProcess(env) as service:
        status, _, body = call(service.url + "/customers/" + created["id"])
        assert status == 200
        assert body == created
        assert call(service.url + "/customers")[2] == [created]


def test_the_embedded_database_is_a_cluster_with_an_append_only_file(tmp_path):
    env = embedded_env(tmp_path)
    with ServiceProcess(env) as service:
        call(service.url + "/customers/1", "PUT", {"name": "Joe"})
    data = tmp_path / "data"
    config = (data / "redis.conf").read_text()
    assert "cluster-enabled yes" in config
    assert "appendfsync always" in config
    assert "Joe" in "".join(path.read_text(errors="replace") for path in data.glob("*.aof"))


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
    b"GET /customers HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    b"NOT A REQUEST LINE\r\n\r\n",
    b"GET /customers HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
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
    # The HTTP server (granian) rejects it before the app sees it: an empty body, or JSON.
    assert "text/html" not in head.lower()
    assert body == "" or json.loads(body)["message"]


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


def test_the_embedded_database_stops_cleanly_even_when_the_service_is_killed(tmp_path):
    env = embedded_env(tmp_path)
    service = ServiceProcess(env).start()
    call(service.url + "/customers/1", "PUT", {"name": "Joe"})
    children = psutil.Process(service.process.pid).children()
    service.process.kill()
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
