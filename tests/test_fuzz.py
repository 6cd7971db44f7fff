"""Schemathesis fuzzes the running service on a real cluster against its OpenAPI document."""

import json
import re
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest

from api_contract import DOCUMENT
from server import create_app
from service_process import ServiceProcess
from settings import Config
from test_contract import documented_operations, registered_operations

pytestmark = pytest.mark.cluster
SETTINGS = Path(__file__).with_name("schemathesis.toml")
TOKEN = "fuzzing-token-0123456789"
MAX_EXAMPLES = 40
TIME_LIMIT_SECONDS = 240
REQUEST_LINE = re.compile(r" customers\.requests: [A-Z]+ \S+ \d{3} ", re.MULTILINE)


def unserved_paths() -> set:
    """Paths of the document that this build of the app does not serve (yet)."""
    app = create_app(Config(), fakeredis.FakeRedis(decode_responses=True))
    served = {path for path, _ in registered_operations(app)}
    return {path for path, _ in documented_operations()} - served


def test_every_generated_request_gets_an_answer_the_document_allows(empty_redis_cluster,
                                                                   tmp_path, capsys):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "THREADS": "8",
           "API_TOKENS": TOKEN, "LOG_LEVEL": "INFO"}
    report = tmp_path / "report.json"
    excluded = [argument for path in sorted(unserved_paths())
                for argument in ("--exclude-path", path)]
    with ServiceProcess(env) as service:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--no-color",
             "--config-file", SETTINGS, "run", DOCUMENT, "--url", service.url,
             "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", str(MAX_EXAMPLES),
             "--request-timeout", "10", "--report", "json", "--report-json-path", report,
             *excluded],
            cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT_SECONDS)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    summary = json.loads(report.read_text())
    requests = len(REQUEST_LINE.findall(service.printed))
    with capsys.disabled():
        print(f"\nschemathesis: {requests} requests served for "
              f"{summary['test_cases']['generated']} generated test cases on "
              f"{summary['operations']['tested']} operations in {summary['running_time']:.0f} s "
              f"(seed {summary['seed']})")
    assert summary["test_cases"]["with_failures"] == 0
    assert requests >= 200
    assert "Traceback" not in service.printed
    assert TOKEN not in service.printed
