"""Close the connections of clients that stall: no byte moved, or a response read too slowly.

A thread blocked in granian on a client (writing a response it does not read, waiting for a
body it does not send) cannot be interrupted from Python; closing the connection's socket
frees it. The worker's own sockets on the service's port are looked at once a second through
the kernel's counters (TCP_INFO, SIOCOUTQ): public Linux interfaces, nothing of granian's.
"""

import fcntl
import logging
import os
import socket
import struct
import sys
import termios
import threading
import time

log = logging.getLogger(__name__)
SWEEP_SECONDS = 1.0
FIRST_SWEEP_SECONDS = 0.02
# The reading rate of a client with a response waiting is measured over this many seconds.
RATE_WINDOW_SECONDS = 5.0
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, since Linux 4.1.
TCP_INFO_SIZE = 136
BYTES_OFFSET = 120
# The kernel's buffer for what a client has not read yet (Linux doubles it for its own use).
# Grown freely it reached megabytes on loopback: a slow reader made the service walk most of
# a 50,000-customer list (3.6 MB) before it blocked, and again each time it reconnected.
SEND_BUFFER_BYTES = 128 * 1024
SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")


class _Seen:
    __slots__ = ("acked", "received", "moved", "window_start", "window_acked")

    def __init__(self, acked: int, received: int, now: float):
        self.acked, self.received, self.moved = acked, received, now
        self.window_start, self.window_acked = None, 0


def _counters(sock: socket.socket) -> tuple[int, int, int]:
    """Return bytes acknowledged by the client, bytes received from it, and bytes queued to it."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    acked, received = struct.unpack_from("QQ", info, BYTES_OFFSET)
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return acked, received, queued


def _client_sockets(port: int):
    """Yield (key, socket) for each socket of this process on port (duplicates); the key of
    the listening socket is None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if not target.startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port):
                try:
                    peer = sock.getpeername()
                except OSError:
                    peer = None  # the listening socket
                yield (target, peer) if peer else None, sock
        except OSError:
            pass  # closed meanwhile
        finally:
            sock.close()


def _limit_send_buffer(listening: socket.socket) -> None:
    """Give connections accepted from now on a fixed send buffer (they inherit it)."""
    if listening.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != 2 * SEND_BUFFER_BYTES:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


class ConnectionWatch:
    """Shut down connections idle past idle_timeout or reading below min_send_rate."""

    def __init__(self, port: int, idle_timeout: float, min_send_rate: int):
        self.port = port
        self.idle_timeout = idle_timeout
        self.min_send_rate = min_send_rate
        self.seen: dict = {}
        self.listening_found = False

    def start(self) -> None:
        """Sweep once a second, in a daemon thread, for the life of the process."""
        if not SUPPORTED:
            log.warning("stalled connections are not closed on %s (Linux only)", sys.platform)
            return
        threading.Thread(target=self._run, name="connection-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            # granian opens a worker's listening socket after the app is built: until its send
            # buffer is set, look often, so that the first clients already get it.
            time.sleep(SWEEP_SECONDS if self.listening_found else FIRST_SWEEP_SECONDS)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad sweep
                log.exception("connection watch sweep failed")

    def sweep(self) -> int:
        """Look at every connection once; shut down the stalled ones and return their number."""
        now, seen, cut = time.monotonic(), {}, 0
        for key, sock in _client_sockets(self.port):
            if key is None:
                _limit_send_buffer(sock)
                self.listening_found = True
                continue
            try:
                acked, received, queued = _counters(sock)
            except OSError:
                continue
            state = self.seen.get(key) or _Seen(acked, received, now)
            seen[key] = state
            if (acked, received) != (state.acked, state.received):
                state.acked, state.received, state.moved = acked, received, now
            reason = self._stalled(state, queued, now)
            if reason:
                log.warning("closed the connection of %s:%s: %s", key[1][0], key[1][1], reason)
                try:
                    # A reset, not a close that would still try to send what is queued.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += 1
                except OSError:
                    pass
                seen.pop(key)
        self.seen = seen
        return cut

    def _stalled(self, state: _Seen, queued: int, now: float) -> str | None:
        if now - state.moved > self.idle_timeout:
            return (f"no byte moved for {now - state.moved:.0f} s "
                    f"(IDLE_TIMEOUT {self.idle_timeout} s)")
        if not queued or not self.min_send_rate:
            state.window_start = None
            return None
        if state.window_start is None:
            state.window_start, state.window_acked = now, state.acked
            return None
        elapsed = now - state.window_start
        if elapsed < RATE_WINDOW_SECONDS:
            return None
        rate = (state.acked - state.window_acked) / elapsed
        state.window_start, state.window_acked = now, state.acked
        if rate < self.min_send_rate:
            return f"read {rate:.0f} bytes/s of its response (MIN_SEND_RATE {self.min_send_rate})"
        return None
