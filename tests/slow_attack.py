"""Slow and idle clients against a running service, and a probe that times one GET at a time."""

import http.client
import json
import resource
import socket
import subprocess
import sys
import threading
import time

PUT_BODY_BYTES = 2000


def raise_open_files(wanted: int) -> None:
    """Raise this process's soft limit of open files towards wanted (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        # A small window, as a slow reader would have: the server's buffers fill sooner.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


class Attack:
    """Slow readers, slow uploaders and idle connections, each replaced when the server drops it."""

    def __init__(self, port: int, readers: int, uploaders: int, idle: int,
                 read_rate: int = 1024, upload_rate: int = 100):
        self.port = port
        self.readers, self.uploaders, self.idle = readers, uploaders, idle
        self.read_rate, self.upload_rate = read_rate, upload_rate
        self.stop = threading.Event()
        self.threads = []
        self.cut = {"reader": 0, "uploader": 0, "idle": 0}
        self.lock = threading.Lock()

    def _count(self, kind: str) -> None:
        with self.lock:
            self.cut[kind] += 1

    def _reader(self) -> None:
        request = f"GET /customers HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        while not self.stop.is_set():
            try:
                with _connect(self.port, receive_buffer=4096) as sock:
                    sock.sendall(request)
                    # read_rate bytes a second, in tenths, until the server closes
                    while sock.recv(self.read_rate // 10) and not self.stop.wait(0.1):
                        pass
            except OSError:
                pass
            if not self.stop.is_set():
                self._count("reader")
                self.stop.wait(0.1)

    def _uploader(self, number: int) -> None:
        head = (f"PUT /customers/slow-{number} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {PUT_BODY_BYTES}\r\n\r\n")
        body = ('{"name": "' + "x" * (PUT_BODY_BYTES - 12) + '"}').encode()
        step = max(1, self.upload_rate // 10)
        while not self.stop.is_set():
            try:
                with _connect(self.port) as sock:
                    sock.sendall(head.encode())
                    sock.setblocking(False)
                    for start in range(0, len(body), step):
                        if self.stop.wait(0.1):
                            break
                        try:
                            sock.recv(4096)
                            break  # answered or closed: either way cut off
                        except BlockingIOError:
                            pass
                        sock.send(body[start:start + step])
            except OSError:
                pass
            if not self.stop.is_set():
                self._count("uploader")
                self.stop.wait(0.1)

    def _open_idle(self, half_sent: bytes | None):
        try:
            sock = _connect(self.port)
        except OSError:
            return None
        try:
            if half_sent:
                sock.sendall(half_sent)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return sock

    def _idle(self) -> None:
        half_sent = f"GET /customers HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nX-Slow: ".encode()
        sockets = []
        try:
            for number in range(self.idle):
                if self.stop.is_set():
                    break
                sockets.append(self._open_idle(half_sent if number % 2 else None))
            # Replace those the server closed, once a second, while the attack lasts.
            while not self.stop.wait(1):
                for index, sock in enumerate(sockets):
                    try:
                        closed = sock is None or sock.recv(1) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed and not self.stop.is_set():
                        if sock is not None:
                            sock.close()
                            self._count("idle")
                        sockets[index] = self._open_idle(half_sent if index % 2 else None)
        finally:
            for sock in sockets:
                if sock is not None:
                    sock.close()

    def __enter__(self):
        targets = [self._idle]
        targets += [self._reader] * self.readers
        targets += [lambda number=number: self._uploader(number)
                    for number in range(self.uploaders)]
        for target in targets:
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def attack_process(port: int, readers: int, uploaders: int, idle: int,
                   seconds: float) -> subprocess.Popen:
    """Start an attack in a process of its own, so that its threads do not slow the probe."""
    arguments = [str(value) for value in (port, readers, uploaders, idle, int(seconds))]
    return subprocess.Popen([sys.executable, __file__, *arguments], stdout=subprocess.PIPE,
                            text=True)


def probe(port: int, path: str, seconds: float, interval: float = 0.25,
          timeout: float = 5.0) -> tuple[int, list[float]]:
    """GET path on a new connection every interval for seconds; return the tries and the
    durations of the successful ones."""
    tries, durations = 0, []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        began = time.monotonic()
        tries += 1
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status == 200:
                durations.append(time.monotonic() - began)
        except OSError:
            pass
        time.sleep(max(0.0, interval - (time.monotonic() - began)))
    return tries, durations


def percentile(values: list[float], share: float) -> float:
    """Return the value below which share of the values lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(share * len(ordered))) - 1))]


def main() -> None:
    """Run an attack on a port for some seconds: port readers uploaders idle seconds."""
    port, readers, uploaders, idle, seconds = (int(value) for value in sys.argv[1:6])
    raise_open_files(idle + 1024)
    with Attack(port, readers, uploaders, idle) as attack:
        attack.stop.wait(seconds)
    print(json.dumps(attack.cut))


if __name__ == "__main__":
    main()
