"""Run the real service (python3 src/server.py) as a process on loopback."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from embedded import free_port

SERVER = Path(__file__).resolve().parent.parent / "src" / "server.py"


class ServiceProcess:
    """The service started with its own environment, stopped with SIGTERM."""

    def __init__(self, env: dict, cwd=None):
        self.port = int(env.get("PORT") or free_port())
        self.env = {**os.environ, "HOST": "127.0.0.1", **env, "PORT": str(self.port)}
        self.cwd = cwd
        self.process = None
        self.printed = ""
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServiceProcess":
        """Start the service and wait until it answers HTTP."""
        # A file, not a pipe: a long run's log must never fill a pipe and block the service.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, str(SERVER)], env=self.env,
                                        cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the service exited: {self.printed}")
            try:
                urllib.request.urlopen(self.url + "/customers/-", timeout=2)
                return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the service did not answer in {timeout} s; it printed: "
                           f"{self.printed[-3000:]}")

    def output(self) -> str:
        """Return what the service has printed so far, while it runs."""
        # A fresh open: seeking the shared file would move the service's own write offset.
        with open(f"/proc/self/fd/{self.log.fileno()}") as log:
            return log.read()

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM, wait for the exit, and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.seek(0)
        self.printed = self.log.read()
        self.log.close()
        return self.process.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
