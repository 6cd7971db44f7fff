"""The service stops when told to, however the stop signal reaches its processes."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from granian.constants import Interfaces

import serving
from embedded import free_port
from service_process import SERVER


def test_a_stop_signal_that_lands_while_the_main_loop_holds_its_lock_still_stops_it():
    server = serving.StoppableServer("customers-service", interface=Interfaces.WSGI)
    threading.Thread(target=server.relay_signals, daemon=True).start()
    woken = server.main_loop_interrupt

    def signal_inside_the_lock():
        with woken._cond:  # where a worker's exit leaves the main thread when SIGTERM lands
            server.signal_handler_interrupt(signal.SIGTERM, None)

    handler = threading.Thread(target=signal_inside_the_lock, daemon=True)
    handler.start()
    handler.join(5)
    assert not handler.is_alive(), "the signal handler waits for a lock its own thread holds"
    assert woken.wait(5), "the main loop was not woken"
    assert server.interrupt_signal


def test_a_worker_does_not_take_its_own_stop_signal_for_the_main_process():
    server = serving.StoppableServer("customers-service", interface=Interfaces.WSGI)
    threading.Thread(target=server.relay_signals, daemon=True).start()
    server.pid = os.getpid() + 1  # as in a forked worker, before it sets its own handlers
    server.signal_handler_reload(signal.SIGHUP, None)
    assert not server.main_loop_interrupt.wait(0.5)
    assert not server.reload_signal


@pytest.mark.parametrize("round_", range(8))
def test_sigterm_to_the_whole_process_group_stops_the_service_with_status_0(round_):
    # systemd's default KillMode signals every process of the unit at once; so does a shell's
    # Ctrl-C (SIGINT). The workers get it as the main process does: it hung once in twenty.
    with tempfile.TemporaryDirectory() as data, tempfile.TemporaryFile("w+") as log:
        port = free_port()
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": data}
        for name in ("DBHOST", "DBPORT"):
            env.pop(name, None)
        service = subprocess.Popen([sys.executable, str(SERVER)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while "Started worker-2" not in _read(log):
                assert service.poll() is None and time.monotonic() < deadline, _read(log)
                time.sleep(0.05)
            time.sleep(round_ * 0.02)  # lands at another moment of the workers' start each round
            os.killpg(service.pid, signal.SIGTERM)
            try:
                status = service.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the service did not stop within 30 s; it printed:\n{_read(log)}")
        finally:
            if service.poll() is None:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait()
        printed = _read(log)
        assert status == 0, printed
        assert "Respawning" not in printed and "Traceback" not in printed, printed
        assert "embedded database stopped" in printed, printed


def _read(log) -> str:
    log.seek(0)
    return log.read()
