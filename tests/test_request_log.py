"""One log line per request, with its id; never a body or a secret; text or JSON."""

import io
import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import request_log
from http_client import call
from service_process import ServiceProcess
from settings import ConfigError, load_config

SRC = Path(__file__).resolve().parent.parent / "src"
# Two workers forked as granian forks them, then their parent: each prints a new request id.
FORKED_IDS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import request_log
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        print(request_log.request_id(""), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
print(request_log.request_id(""), flush=True)
"""
JOE = {"name": "Joe", "email": "joe@example.com", "phone": "+1 555 0100"}


@pytest.fixture
def request_lines(caplog):
    """Return a function that lists the request log records so far."""
    caplog.set_level(logging.INFO, logger="customers.requests")
    return lambda: [record for record in caplog.records if record.name == "customers.requests"]


def test_each_request_is_one_line_with_method_path_status_duration_and_id(client, request_lines):
    response = client.post("/customers", json=JOE)
    client.get("/customers/nobody")
    first, second = request_lines()
    assert (first.method, first.path, first.status) == ("POST", "/customers", 201)
    assert (second.method, second.path, second.status) == ("GET", "/customers/nobody", 404)
    assert first.duration_ms >= 0
    assert first.request_id == response.headers["X-Request-ID"]
    assert re.fullmatch(r"POST /customers 201 \d+\.\dms id=[0-9a-f]{32}", first.getMessage())


def test_bodies_never_reach_the_log(client, caplog):
    caplog.set_level(logging.DEBUG)
    client.post("/customers", json=JOE)
    client.put("/customers/1", json=JOE)
    client.get("/customers/1")
    client.get("/customers")
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    for value in JOE.values():
        assert value not in logged


def test_a_valid_client_request_id_is_kept_and_echoed(client, request_lines):
    for sent in ("abc-123", "0f9c2b7e-5c1a-4d8e-9a55-2f6c0b1d9e44", "a" * 128, "trace:1/2+x=y"):
        response = client.get("/customers/nobody", headers={"X-Request-ID": sent})
        assert response.headers["X-Request-ID"] == sent
        assert request_lines()[-1].request_id == sent


@pytest.mark.parametrize("sent", ["", "a" * 129, "has space", "tab\there", "é", "<script>"])
def test_an_unusable_client_request_id_is_replaced_by_a_new_one(client, request_lines, sent):
    response = client.get("/customers", headers={"X-Request-ID": sent})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert request_lines()[-1].request_id == response.headers["X-Request-ID"]


def test_errors_and_refusals_are_logged_and_carry_an_id_too(client, request_lines):
    response = client.post("/customers", data="{oops", content_type="application/json")
    assert response.status_code == 400
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert client.delete("/customers").status_code == 405
    assert [(r.method, r.status) for r in request_lines()] == [("POST", 400), ("DELETE", 405)]
    assert request_lines()[0].request_id == response.headers["X-Request-ID"]


def test_a_path_cannot_forge_a_second_log_line(client, request_lines):
    client.get("/customers/a%0Ab%0D%1B")
    (line,) = request_lines()
    assert "\n" not in line.getMessage() and "\r" not in line.getMessage()
    assert "a\\nb\\r\\x1b" in line.getMessage()


def test_the_json_format_writes_one_object_per_line_with_the_fields():
    stream = io.StringIO()
    logger = logging.getLogger("customers.requests.test")
    logger.addHandler(request_log.handler("json", stream))
    logger.propagate = False
    try:
        logger.warning("GET /x 200", extra={"method": "GET", "status": 200, "request_id": "r1"})
    finally:
        logger.handlers.clear()
    record = json.loads(stream.getvalue())
    assert record["message"] == "GET /x 200"
    assert (record["method"], record["status"], record["request_id"]) == ("GET", 200, "r1")
    assert (record["level"], record["logger"]) == ("WARNING", "customers.requests.test")


@pytest.mark.cluster
def test_the_running_service_logs_json_lines_without_bodies_or_tokens(empty_redis_cluster):
    token = "log-test-token-0123456789"
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "LOG_FORMAT": "json",
           "API_TOKENS": token}
    with ServiceProcess(env) as service:
        assert call(service.url + "/customers/1", "GET")[0] == 401
        put = urllib.request.Request(service.url + "/customers/1", json.dumps(JOE).encode(),
                                     method="PUT", headers={"Authorization": f"Bearer {token}",
                                                            "Content-Type": "application/json"})
        with urllib.request.urlopen(put, timeout=10) as response:
            assert response.status == 201
    lines = [json.loads(line) for line in service.printed.splitlines() if line.strip()]
    requests = [(line["method"], line["path"], line["status"]) for line in lines
                if line["logger"] == "customers.requests"]
    assert requests[-2:] == [("GET", "/customers/1", 401), ("PUT", "/customers/1", 201)]
    # The server's own lines (granian's "Starting granian", "Listening at", ...) are JSON too.
    assert any(line["logger"] == "_granian" for line in lines)
    assert token not in service.printed
    assert all(value not in service.printed for value in JOE.values())


def test_log_format_is_text_by_default_and_json_on_request():
    assert load_config({}).log_format == "text"
    assert load_config({"LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be text or json"):
        load_config({"LOG_FORMAT": "xml"})


def test_workers_forked_from_one_process_draw_different_request_ids():
    # In an interpreter of its own: forking pytest's, which runs threads, is not safe.
    drawn = subprocess.run([sys.executable, "-c", FORKED_IDS, str(SRC)], capture_output=True,
                           text=True, timeout=60, check=True).stdout.split()
    assert len(drawn) == 3 and len(set(drawn)) == 3
