"""Every target `make help` lists works; the ones that start and stop by themselves are run here."""

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from embedded import free_port
from service_process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
# Targets too long for `make test`: bench (minutes) and reliability (the fault tests, which
# `make test` runs anyway); test itself would recurse; clean would remove the venv in use.
NOT_RUN_HERE = {"bench", "reliability", "test", "clean"}


def make(*arguments, **options) -> subprocess.CompletedProcess:
    """Run make in the project's folder and return what it printed."""
    return subprocess.run(["make", "--no-print-directory", *arguments], cwd=ROOT,
                          capture_output=True, text=True, **options)


def listed_targets() -> list:
    """Return the targets `make help` lists."""
    return re.findall(r"^  make (\S+)", make("help", timeout=30).stdout, re.MULTILINE)


class Started:
    """A make target running in a session of its own, its output in a file."""

    def __init__(self, *arguments, env=None):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            ["make", "--no-print-directory", *arguments], cwd=ROOT,
            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def printed(self) -> str:
        """Return what the target printed so far."""
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, text: str, timeout: float) -> None:
        """Wait until the target prints text."""
        deadline = time.monotonic() + timeout
        while text not in self.printed():
            assert self.process.poll() is None, self.printed()
            assert time.monotonic() < deadline, self.printed()
            time.sleep(0.2)

    def stop(self, sig) -> int:
        """Send sig to the target's process group and return make's exit status."""
        os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make did not stop within 60 s of {signal.Signals(sig).name}; it "
                        f"printed:\n{self.printed()}")
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.output = self.printed()
            self.log.close()


def test_help_lists_every_target_with_what_it_does():
    targets = listed_targets()
    assert {"run", "test", "cluster", "fuzz", "lint", "bench", "reliability"} <= set(targets)
    text = (ROOT / "Makefile").read_text()
    assert set(targets) == set(re.findall(r"^([a-z-]+):.*## ", text, re.MULTILINE))


def test_lint_passes():
    run = make("lint", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.cluster
def test_cluster_starts_a_memorydb_shaped_cluster_until_interrupted(tls_redis_server_binary):
    target = Started("cluster")
    try:
        target.wait_for("Ctrl-C stops the cluster.", timeout=90)
        port = re.search(r"on ports (\d+)", target.printed()).group(1)
        assert "DBUSERNAME=app" in target.printed()
    finally:
        status = target.stop(signal.SIGINT)
    assert "cluster stopped" in target.output
    # The cluster stopped cleanly; make reports the interrupt by dying of it.
    assert status in (0, -signal.SIGINT), target.output
    with pytest.raises(ConnectionRefusedError):  # its first node no longer listens
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()


@pytest.mark.cluster
def test_run_serves_on_the_embedded_database_and_stops_on_sigterm(tmp_path):
    port = free_port()
    target = Started("run", env={"PORT": str(port), "DATA_DIR": str(tmp_path / "data")})
    try:
        target.wait_for("embedded", timeout=180)  # make may first install requirements.txt
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/customers", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, target.printed()
                time.sleep(0.2)
    finally:
        target.stop(signal.SIGTERM)
    assert "Traceback" not in target.output


@pytest.mark.cluster
def test_fuzz_passes_against_a_service_without_tokens(empty_redis_cluster):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "THREADS": "4"}
    with ServiceProcess(env) as service:
        run = make("fuzz", f"URL={service.url}", "EXAMPLES=5", timeout=300)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]


def test_every_listed_target_is_run_here_or_named_as_not():
    tested = {"help", "lint", "cluster", "run", "fuzz"}
    assert set(listed_targets()) == tested | NOT_RUN_HERE
