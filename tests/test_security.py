"""Secure by default: no open service beyond loopback, safe headers, no secret in sight."""

import dataclasses
import gzip
import http.client
import io
import json
import logging
import secrets
import socket
import subprocess
import sys

import fakeredis
import pytest
from dotenv import dotenv_values

from embedded import free_port
from errors import RETRY_AFTER_SECONDS
from http_client import read_until_closed
from server import create_app
from service_process import SERVER, ServiceProcess
from settings import Config, ConfigError, load_config

TOKEN = "security-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
NEW_TOKEN_HINT = "API_TOKENS=<token>"


# Start-up: refuse to serve beyond loopback without tokens, unless AUTH=none says so.

@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "[::]", "customers.internal"])
def test_a_host_beyond_loopback_without_tokens_is_a_config_error_naming_the_fix(host):
    with pytest.raises(ConfigError, match=r"API_TOKENS=<token>.*AUTH=none"):
        load_config({"HOST": host})


@pytest.mark.parametrize("env", [
    {"HOST": "0.0.0.0", "API_TOKENS": TOKEN},
    {"HOST": "0.0.0.0", "AUTH": "none"},
    {"HOST": "192.0.2.10", "AUTH": "NONE"},
    {"HOST": "127.0.0.1"}, {"HOST": "localhost"}, {"HOST": "::1"}, {"HOST": "127.0.0.2"},
    {"HOST": "127.0.0.1", "AUTH": "none"},
    {"HOST": "0.0.0.0", "AUTH": "tokens", "API_TOKENS": TOKEN},
    {"API_TOKENS": ""},
])
def test_tokens_or_an_explicit_auth_none_or_loopback_start(env):
    config = load_config(env)
    assert config.auth == ("none" if env.get("AUTH", "").lower() == "none" else "tokens")


@pytest.mark.parametrize(("env", "words"), [
    ({"API_TOKENS": ",,,"}, "API_TOKENS is set but holds no token"),
    ({"API_TOKENS": " "}, "API_TOKENS is set but holds no token"),
    ({"API_TOKENS": " , ,", "HOST": "127.0.0.1"}, "API_TOKENS is set but holds no token"),
    ({"AUTH": "none", "API_TOKENS": TOKEN}, "AUTH=none serves without tokens"),
    ({"AUTH": "basic"}, "AUTH must be tokens or none"),
    ({"AUTH": "off", "HOST": "0.0.0.0"}, "AUTH must be tokens or none"),
])
def test_tokens_that_are_not_there_or_a_confused_auth_are_config_errors(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(env)


@pytest.mark.parametrize(("env", "words"), [
    ({}, NEW_TOKEN_HINT),
    ({"API_TOKENS": ",,,"}, "holds no token"),
    ({"AUTH": "maybe"}, "AUTH must be"),
])
def test_the_service_refuses_to_start_with_exit_2_and_one_line(tmp_path, env, words):
    data = tmp_path / "data"
    environment = {"PATH": "/usr/bin:/bin", "HOST": "192.0.2.10", "PORT": str(free_port()),
                   "DATA_DIR": str(data), **env}
    done = subprocess.run([sys.executable, str(SERVER)], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("configuration error: ")
    assert words in lines[0]
    assert not data.exists()  # refused before anything started: no database, no socket


# Headers: nosniff on every answer, no-store on every answer that needed a token.

def boom():
    """Fail like a bug would."""
    raise RuntimeError("a bug")


@pytest.fixture(params=["tokens", "open"])
def any_client(request):
    """A test client of the app with a token, and one of the app open (no tokens)."""
    tokens = (TOKEN,) if request.param == "tokens" else ()
    app = create_app(Config(api_tokens=tokens, max_body_bytes=1000),
                     fakeredis.FakeRedis(decode_responses=True))
    app.add_url_rule("/boom", "boom", boom)
    return app.test_client(), bool(tokens)


def every_kind_of_answer(client, headers):
    """Send requests that get every kind of answer; return (response, needed a token) pairs."""
    json_type = {"Content-Type": "application/json"}
    created = client.post("/customers", json={"name": "Ann"}, headers=headers)
    client.put("/customers/7", json={"name": "Joe"}, headers=headers)
    etag = client.get("/customers/7", headers=headers).headers["ETag"]
    return [
        (client.get("/healthz"), False),
        (client.get("/readyz"), False),
        (created, True),
        (client.get("/customers/7", headers={**headers, "If-None-Match": etag}), True),
        (client.put("/customers/7", json={"age": 3}, headers=headers), True),
        (client.get("/customers/7", headers=headers), True),
        (client.get("/customers", headers=headers), True),
        (client.get("/customers?limit=1", headers=headers), True),
        (client.get("/customers/8", headers=headers), True),
        (client.get("/nowhere", headers=headers), True),
        (client.post("/customers/7", json={"a": 1}, headers=headers), True),
        (client.put("/customers/7", data="{", headers={**headers, **json_type}), True),
        (client.put("/customers/7", data="x", headers={**headers, "Content-Type": "text/plain"}),
         True),
        (client.put("/customers/7", json={"a": "x" * 2000}, headers=headers), True),
        (client.get("/openapi.json", headers=headers), True),
        (client.get("/boom", headers=headers), True),
        (client.get("/customers"), True),  # 401 when tokens are configured
        (client.delete("/customers/7", headers=headers), True),
    ]


def test_every_answer_forbids_sniffing_and_every_guarded_one_forbids_storing(any_client, caplog):
    client, with_tokens = any_client
    caplog.set_level(logging.CRITICAL)  # the 500's traceback is expected here
    answers = every_kind_of_answer(client, BEARER if with_tokens else {})
    statuses = {response.status_code for response, _ in answers}
    assert {200, 201, 204, 304, 400, 404, 405, 413, 415, 500} <= statuses
    assert (401 in statuses) == with_tokens
    for response, guarded in answers:
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.status
        expected = "no-store" if guarded and with_tokens else None
        assert response.headers.get("Cache-Control") == expected, response.status


# /readyz: ready or not to anyone, why only to a trusted request, always in the log.

@pytest.fixture
def down_database() -> Config:
    """A configuration naming a database that is not there."""
    return Config(db_host="127.0.0.1", db_port=free_port(), db_tls=False, db_timeout=0.5,
                  db_retry_seconds=0)


@pytest.mark.parametrize(("tokens", "headers", "remote", "details"), [
    ((TOKEN,), {}, "127.0.0.1", False),
    ((TOKEN,), {"Authorization": "Bearer wrong-token-0123456789"}, "127.0.0.1", False),
    ((TOKEN,), {"Authorization": "Basic dXNlcjpwYXNz"}, "127.0.0.1", False),
    ((TOKEN,), BEARER, "10.1.2.3", True),
    ((TOKEN,), BEARER, "127.0.0.1", True),
    ((), {}, "127.0.0.1", True),
    ((), {}, "::1", True),
    ((), {}, "10.1.2.3", False),
    ((), BEARER, "10.1.2.3", False),
])
def test_readyz_tells_why_only_to_a_trusted_request_and_always_to_the_log(
        down_database, open_database, caplog, tokens, headers, remote, details):
    caplog.set_level(logging.WARNING)
    config = dataclasses.replace(down_database, api_tokens=tokens)
    client = create_app(config, open_database(config)).test_client()
    response = client.get("/readyz", headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    why = "not ready: database unreachable: "
    message = response.get_json()["message"]
    if details:
        assert message.startswith(why) and f"127.0.0.1:{config.db_port}" in message
    else:
        assert message == "not ready"
    assert why in caplog.text and f"127.0.0.1:{config.db_port}" in caplog.text


def test_readyz_says_ready_to_anyone(redis_client):
    client = create_app(Config(api_tokens=(TOKEN,)), redis_client).test_client()
    for headers in ({}, BEARER, {"Authorization": "Bearer wrong-token-0123456789"}):
        response = client.get("/readyz", headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.9"})
        assert (response.status_code, response.get_json()) == (200, {"status": "ready"})


# Secrets: never in a repr, a log line or an answer.

def test_the_configuration_repr_shows_no_password_and_no_token():
    config = load_config({"DBHOST": "h", "DBUSERNAME": "app", "DBPASSWORD": "hunter2-secret-pw",
                          "API_TOKENS": TOKEN})
    assert config.db_password == "hunter2-secret-pw"
    for text in (repr(config), str(config), f"{config}", repr([config])):
        assert "hunter2" not in text
        assert TOKEN not in text
        assert "db_username='app'" in text


@pytest.mark.cluster
def test_the_connected_client_shows_no_password_in_its_reprs(memorydb_cluster,
                                                             memorydb_database):
    cluster = memorydb_database.client()
    nodes = cluster.get_nodes()
    shown = [repr(memorydb_database), repr(cluster), *map(repr, nodes),
             *(repr(node.redis_connection.connection_pool) for node in nodes)]
    assert len(nodes) >= memorydb_cluster.primaries
    assert not [text for text in shown if memorydb_cluster.security.app_password in text]


def test_the_example_environment_file_starts_with_the_defaults():
    values = dotenv_values(SERVER.parent.parent / ".env.example")
    assert values["AUTH"] == Config.auth
    config = load_config(values)
    assert (config.auth, config.api_tokens, config.host) == ("tokens", (), "127.0.0.1")


@pytest.mark.cluster
def test_a_wrong_database_password_never_shows_in_logs_answers_or_readyz(memorydb_cluster):
    password = "wrong-password-" + secrets.token_hex(8)
    env = {**memorydb_cluster.service_env(), "DBPASSWORD": password, "API_TOKENS": TOKEN,
           "WORKERS": "1", "DBTIMEOUT": "1", "DBRETRYSECONDS": "1", "LOG_LEVEL": "DEBUG"}
    with ServiceProcess(env) as service:
        answers = [send(service.port, method, path, body, token)
                   for path, method, body, token in [
                       ("/customers/1", "GET", None, TOKEN),
                       ("/customers/1", "PUT", {"name": "Ann"}, TOKEN),
                       ("/customers", "POST", {"name": "Ann"}, TOKEN),
                       ("/customers", "GET", None, TOKEN),
                       ("/customers/1", "GET", None, "wrong-token-0123456789"),
                       ("/readyz", "GET", None, TOKEN),
                       ("/readyz", "GET", None, None),
                       ("/healthz", "GET", None, None)]]
        assert [status for status, _ in answers] == [503, 503, 503, 503, 401, 503, 503, 200]
        details = answers[5][1]
        assert "invalid username-password pair" in details
        assert json.loads(answers[6][1]) == {"message": "not ready"}
    log = service.printed
    assert "invalid username-password pair" in log  # the operator still learns why
    for _, body in answers:
        assert password not in body
        assert memorydb_cluster.security.app_password not in body
    assert password not in log
    assert TOKEN not in log
    assert "wrong-token" not in log


def send(port, method, path, body=None, token=None) -> tuple[int, str]:
    """Send a JSON request with a bearer token (or none); return the status and the raw body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# A chunked body (no Content-Length) over MAX_BODY_BYTES is refused as a sized one is.

LIMIT = 1000
# The first LIMIT bytes are a whole JSON object: cut at the limit, it would be stored.
OVER = b'{"name": "Eve"}' + b" " * (3 * LIMIT)
AT_LIMIT = b'{"name": "' + b"x" * (LIMIT - 12) + b'"}'
TOO_LARGE = {"message": "The data value transmitted exceeds the capacity limit."}


def test_a_chunked_body_over_the_limit_is_413_and_stores_nothing(any_client):
    client, with_tokens = any_client
    headers = {**(BEARER if with_tokens else {}), "Content-Type": "application/json",
               "Transfer-Encoding": "chunked"}
    chunked = {"headers": headers, "environ_overrides": {"wsgi.input_terminated": True}}
    patch_type = {"Content-Type": "application/merge-patch+json"}
    merge_patch = {**chunked, "headers": {**headers, **patch_type}}
    assert client.put("/customers/9", input_stream=io.BytesIO(OVER[:LIMIT]),
                      **chunked).status_code == 201
    for method, path, options in (("PUT", "/customers/1", chunked), ("POST", "/customers", chunked),
                                  ("PATCH", "/customers/9", merge_patch)):
        response = client.open(path, method=method, input_stream=io.BytesIO(OVER), **options)
        assert (response.status_code, response.get_json()) == (413, TOO_LARGE)
        sized_headers = {name: value for name, value in options["headers"].items()
                         if name != "Transfer-Encoding"}
        sized = client.open(path, method=method, data=OVER, headers=sized_headers)
        assert (sized.status_code, sized.get_json()) == (413, TOO_LARGE)
    listed = client.get("/customers", headers=BEARER if with_tokens else {}).get_json()
    assert listed == [{"id": "9", "name": "Eve"}]
    assert client.put("/customers/10", input_stream=io.BytesIO(AT_LIMIT),
                      **chunked).status_code == 201


def raw_request(port, head: bytes, body: bytes = b"") -> http.client.HTTPResponse:
    """Send bytes as they are on a new connection and read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    sock.close()
    return response


def chunks(body: bytes, size: int = 200, last: bool = True) -> bytes:
    """Encode a body in chunks of size bytes, ended by the last chunk unless last is False."""
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                       for i in range(0, len(body), size))
    return encoded + (b"0\r\n\r\n" if last else b"")


def chunked_head(method: str, path: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()


@pytest.mark.cluster
@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_the_real_service_refuses_a_chunked_body_over_the_limit(memorydb_cluster):
    env = {**memorydb_cluster.service_env(), "API_TOKENS": TOKEN, "WORKERS": "1",
           "MAX_BODY_BYTES": str(LIMIT)}
    with ServiceProcess(env) as service:
        for method, path in (("PUT", "/customers/1"), ("POST", "/customers")):
            response = raw_request(service.port, chunked_head(method, path), chunks(OVER))
            assert response.status == 413
            assert json.loads(response.body) == TOO_LARGE
            assert response.getheader("Content-Type") == "application/json"
            assert response.getheader("X-Content-Type-Options") == "nosniff"
            assert response.getheader("Cache-Control") == "no-store"
        # A body that never ends is refused once the limit is passed, not read to its end.
        endless = raw_request(service.port, chunked_head("PUT", "/customers/2"),
                              chunks(b" " * (2 * LIMIT), size=LIMIT + 1, last=False))
        assert endless.status == 413
        assert send(service.port, "GET", "/customers", token=TOKEN) == (200, "[]\n")
        assert raw_request(service.port, chunked_head("PUT", "/customers/3"),
                           chunks(AT_LIMIT)).status == 201
    stored = [key for node in memorydb_cluster.primary_nodes()
              for key in memorydb_cluster.admin(node).keys()]
    assert stored == ["customer:3"]


@pytest.mark.cluster
@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_the_real_service_refuses_a_compressed_body(memorydb_cluster):
    env = {**memorydb_cluster.service_env(), "API_TOKENS": TOKEN, "WORKERS": "1"}
    body = b'{"name": "Ada"}'
    with ServiceProcess(env) as service:
        for coding, sent in (("gzip", gzip.compress(body)), ("gzip", body), ("deflate", body)):
            head = (f"PUT /customers/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    f"{TOKEN}\r\nContent-Type: application/json\r\nContent-Encoding: {coding}"
                    f"\r\nContent-Length: {len(sent)}\r\n\r\n").encode()
            response = raw_request(service.port, head, sent)
            assert response.status == 415
            assert response.getheader("Accept-Encoding") == "identity"
            assert "without Content-Encoding" in json.loads(response.body)["message"]
        # granian undoes chunked and passes gzip on: the plain body would have been stored.
        for coding in ("gzip, chunked", "gzip\r\nTransfer-Encoding: chunked"):
            head = (f"PUT /customers/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    f"{TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: {coding}"
                    "\r\n\r\n").encode()
            response = raw_request(service.port, head, chunks(body))
            assert response.status == 501
            assert "but chunked" in json.loads(response.body)["message"]
        assert send(service.port, "GET", "/customers", token=TOKEN) == (200, "[]\n")


@pytest.mark.cluster
@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_the_real_service_routes_a_doubled_slash_or_foreign_bytes_to_no_other_id(memorydb_cluster):
    env = {**memorydb_cluster.service_env(), "API_TOKENS": TOKEN, "WORKERS": "1"}
    with ServiceProcess(env) as service:
        assert send(service.port, "PUT", "/customers/x", {"name": "X"}, TOKEN)[0] == 201
        assert send(service.port, "PUT", "/customers//x", {"name": "Slash"}, TOKEN)[0] == 201
        assert send(service.port, "GET", "/customers/%2Fx", token=TOKEN) == (
            200, '{"id":"/x","name":"Slash"}\n')
        assert send(service.port, "DELETE", "/customers//x", token=TOKEN)[0] == 204
        assert send(service.port, "GET", "/customers", token=TOKEN) == (
            200, '[{"id":"x","name":"X"}]\n')
        # %FF is no UTF-8: it once named customer "\ufffd", as %FE and %EF%BF%BD do.
        assert send(service.port, "PUT", "/customers/%EF%BF%BD", {"name": "R"}, TOKEN)[0] == 201
        for method in ("GET", "PUT", "DELETE"):
            status, body = send(service.port, method, "/customers/%FF", {"name": "Eve"}, TOKEN)
            assert status == 400
            assert "not UTF-8 once percent-decoded" in body
        status, body = send(service.port, "GET", "/customers?fields=%FE", token=TOKEN)
        assert status == 400
        assert "the query string is not UTF-8" in body
        assert send(service.port, "GET", "/customers/%EF%BF%BD", token=TOKEN) == (
            200, '{"id":"\ufffd","name":"R"}\n')


def _answers(port, data: bytes) -> bytes:
    """Send bytes as they are and return all the server answers before it closes (or 3 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


@pytest.mark.cluster
@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_what_is_not_http_is_refused_by_the_server_and_nothing_runs(memorydb_cluster):
    env = {**memorydb_cluster.service_env(), "API_TOKENS": TOKEN, "WORKERS": "1"}
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    put = (b"PUT /customers/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
           + b"Content-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"name\":\"Eve\"}")
    with ServiceProcess(env) as service:
        for data, status in [
            (b"G\x01T /customers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + put, b"400"),
            (b"GET /customers/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n" + put, b"400"),
            (b"GET /customers/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             + b"".join(b"X-%d: v\r\n" % n for n in range(101)) + b"\r\n" + put, b"431"),
            (b"POST /customers HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: "
             b"application/json\r\nContent-Length: 14\r\nContent-Length: 15\r\n\r\n" + put, b"400"),
        ]:
            answers = _answers(service.port, data)
            # One answer, empty, and the connection closed: the request behind it never runs.
            assert answers.startswith(b"HTTP/1.1 " + status), answers[:200]
            assert answers.count(b"HTTP/1.1 ") == 1
            assert answers.endswith(b"\r\n\r\n")
        # Both lengths: the body is read as chunked (empty here), then the connection closes.
        smuggling = (b"POST /customers HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: "
                     b"application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n" + put)
        answers = _answers(service.port, smuggling)
        assert answers.startswith(b"HTTP/1.1 400 ") and answers.count(b"HTTP/1.1 ") == 1
        assert send(service.port, "GET", "/customers", token=TOKEN) == (200, "[]\n")


@pytest.mark.cluster
@pytest.mark.usefixtures("empty_memorydb_cluster")
def test_the_real_service_open_on_loopback_answers_another_hosts_name_with_421(memorydb_cluster):
    env = {**memorydb_cluster.service_env(), "WORKERS": "1"}
    with ServiceProcess(env) as service:
        assert send(service.port, "PUT", "/customers/1", {"name": "Ada"})[0] == 201
        # What a browser sends for a page whose name now points at 127.0.0.1.
        for head in (b"GET /customers HTTP/1.1\r\nHost: evil.example:%d\r\n\r\n" % service.port,
                     b"DELETE /customers/1 HTTP/1.1\r\nHost: evil.example\r\n\r\n"):
            response = raw_request(service.port, head)
            assert response.status == 421
            assert json.loads(response.body)["message"].startswith("Host 'evil.example")
        # A label werkzeug cannot bind once made a bare 500.
        response = raw_request(service.port, b"GET /customers HTTP/1.1\r\nHost: %s\r\n\r\n"
                               % (b"a" * 64))
        assert response.status == 421
        assert json.loads(response.body)["message"].startswith("Host 'aaaa")
        assert send(service.port, "GET", "/customers") == (200, '[{"id":"1","name":"Ada"}]\n')
