"""Deadlines for request bodies and responses, and a cap on the requests that run Python at once.

granian gives each request a thread for its whole life, reading the body and sending the
response included. Here a request reads its body before it takes one of the worker's THREADS
slots, and a streamed response gives its slot back while the client reads: slow clients wait
on threads of their own (see serving.py), not on the slots that others need.
"""

import io
import logging
import threading
import time
from collections import deque

from flask import json
from werkzeug.exceptions import RequestTimeout

import request_log
from errors import RETRY_AFTER_SECONDS

log = logging.getLogger(__name__)
# Answered without a slot: the liveness check, which must answer while the database hangs.
UNQUEUED_PATHS = frozenset({"/healthz"})
# Bodies read as the app asks for them, not before: NDJSON imports (up to MAX_IMPORT_BYTES).
STREAMED_BODIES = ("application/x-ndjson",)
# A body gets this long before its rate counts, and is read this often when it trickles.
BODY_GRACE_SECONDS = 2.0
READS_PER_SECOND = 10
LARGEST_READ = 64 * 1024
STREAM_SLOTS = 1
# Imports running at once in a worker. An import keeps its slot while its body arrives, and at
# MIN_BODY_RATE a body of MAX_IMPORT_BYTES takes days: more imports could hold every slot.
IMPORTS_PER_WORKER = 1
_END = object()


class Slots:
    """A semaphore that hands a freed slot to the longest waiter (threading's lets any take it)."""

    def __init__(self, count: int):
        self._lock = threading.Lock()
        self._free = count
        self._waiters = deque()

    def __enter__(self):
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by the __exit__ that hands this thread its slot

    def __exit__(self, *exc):
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


def _request_id(environ) -> tuple:
    """Return the X-Request-ID header of an answer given before the app (408, 429)."""
    return request_log.HEADER, request_log.request_id(environ.get(request_log.ENVIRON_KEY, ""))


def _expects_body(environ) -> bool:
    length = environ.get("CONTENT_LENGTH", "")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return chunked or (length.isdigit() and int(length) > 0)


class Deadlines:
    """Wrap a WSGI app: bodies read against a deadline, at most `threads` requests in the app."""

    def __init__(self, app, config):
        self.app = app
        self.config = config
        self.slots = Slots(config.threads)
        # Streamed lists make their chunks one at a time in a worker: many lists at once (slow
        # readers reconnecting) would otherwise keep every slot and the GIL from short requests.
        self.stream_slots = Slots(STREAM_SLOTS)
        self.imports = threading.BoundedSemaphore(IMPORTS_PER_WORKER)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") in UNQUEUED_PATHS:
            # Never waits behind requests that wait on the database: it never asks it.
            return self.app(environ, start_response)
        streamed = environ.get("CONTENT_TYPE", "").split(";")[0].strip() in STREAMED_BODIES
        if streamed:
            if _expects_body(environ):
                return self._import(environ, start_response)
            environ["wsgi.input"] = PacedInput(environ, self.config)
        elif _expects_body(environ):
            body = self._read_body(environ)
            if body is None:
                return self._too_slow(environ, start_response)
            environ["wsgi.input"] = io.BytesIO(body)
            coding = environ.pop("HTTP_TRANSFER_ENCODING", None)
            if coding:
                # A chunked body, now read whole: over MAX_BODY_BYTES it gets 413 as any other.
                environ["CONTENT_LENGTH"] = str(len(body))
                if coding.strip().lower() != "chunked":
                    # gzip, say, stays named for the app to refuse (validation.check_not_encoded).
                    environ["HTTP_TRANSFER_ENCODING"] = coding
        return self._run(environ, start_response)

    def _import(self, environ, start_response):
        """Run an import, its body read as the app asks for it; 429 while another runs."""
        if not self.imports.acquire(blocking=False):
            return self._busy(environ, start_response)
        environ["wsgi.input"] = PacedInput(environ, self.config)
        try:
            return self._run(environ, start_response)
        finally:
            self.imports.release()

    def _run(self, environ, start_response):
        """Call the app in a slot; a streamed response makes each chunk in one."""
        with self.slots:
            result = self.app(environ, start_response)
            if not environ.get("customers.streamed"):
                # The whole body handed over at once: granian sends it without this thread.
                try:
                    return [b"".join(result)]
                finally:
                    getattr(result, "close", lambda: None)()
        return self._stream(result, environ)

    def _read_body(self, environ) -> bytes | None:
        """Return the body (at most MAX_BODY_BYTES + 1), or None if it came too slowly."""
        length = environ.get("CONTENT_LENGTH", "")
        limit = self.config.max_body_bytes + 1
        if length.isdigit():
            if int(length) > self.config.max_body_bytes:
                return b""  # refused with 413 unread
            limit = int(length)
        body = PacedInput(environ, self.config, total_timeout=True)
        try:
            return body.read(limit)
        except RequestTimeout:
            return None


    def _too_slow(self, environ, start_response):
        body = json.dumps({"message": "the request body came too slowly; send it faster"})
        start_response("408 Request Timeout", [("Content-Type", "application/json"),
                                               ("Connection", "close"), _request_id(environ)])
        return [body.encode() + b"\n"]

    def _busy(self, environ, start_response):
        body = json.dumps({"message": f"imports run {IMPORTS_PER_WORKER} at a time in each "
                                      "worker and one is running; send this one again shortly"})
        # The body is left unread: the connection cannot carry another request.
        start_response("429 Too Many Requests", [("Content-Type", "application/json"),
                                                 ("Retry-After", str(RETRY_AFTER_SECONDS)),
                                                 ("Connection", "close"),
                                                 _request_id(environ)])
        return [body.encode() + b"\n"]

    def _stream(self, result, environ):
        """Yield the response's chunks, each made in a slot; stop after SEND_TIMEOUT."""
        started, sent = time.monotonic(), 0
        iterator = iter(result)
        try:
            while True:
                with self.stream_slots, self.slots:
                    chunk = next(iterator, _END)
                if chunk is _END:
                    return
                yield chunk
                sent += len(chunk)
                elapsed = time.monotonic() - started
                if elapsed > self.config.send_timeout:
                    log.warning("cut off %s %s: %d bytes sent in %.1f s (SEND_TIMEOUT %s s)",
                                environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), sent,
                                elapsed, self.config.send_timeout)
                    return
        except GeneratorExit:
            # granian could not send: the client left, or its connection was closed as stalled.
            log.warning("stopped %s %s after %d bytes: the connection closed",
                        environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), sent)
            raise
        finally:
            with self.slots:
                getattr(result, "close", lambda: None)()


class PacedInput:
    """A request body read in pieces sized to its pace, cut off (408) when it comes too slowly.

    granian's read(n) waits for n bytes, and no one can interrupt it: each piece asks for what a
    tenth of a second brings, so that the rate is checked often. A body read ahead of the app
    keeps BODY_TIMEOUT too; one the app reads as it goes (an import) only MIN_BODY_RATE.
    """

    def __init__(self, environ, config, total_timeout: bool = False):
        self.environ = environ
        self.stream = environ["wsgi.input"]
        self.config = config
        self.timeout = config.body_timeout if total_timeout else float("inf")
        self.started = time.monotonic()
        self.received = 0
        self.size = 1

    def read(self, size: int = -1) -> bytes:
        """Return up to size bytes (all when size < 0), fewer only at the body's end."""
        chunks, wanted = [], size if size >= 0 else float("inf")
        got = 0
        while got < wanted:
            chunk = self.stream.read(int(min(self.size, wanted - got)))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            self._check(len(chunk))
        return b"".join(chunks)

    def _check(self, count: int) -> None:
        self.received += count
        elapsed = time.monotonic() - self.started
        allowed = BODY_GRACE_SECONDS + self.received / (self.config.min_body_rate or float("inf"))
        if elapsed > self.timeout or elapsed > allowed:
            log.warning("cut off %s %s: %d body bytes in %.1f s (MIN_BODY_RATE %d, "
                        "BODY_TIMEOUT %s s)", self.environ.get("REQUEST_METHOD"),
                        self.environ.get("PATH_INFO"), self.received, elapsed,
                        self.config.min_body_rate, self.config.body_timeout)
            raise RequestTimeout("the request body came too slowly; send it faster")
        # At most double what came so far: a first burst says little of the rate.
        rate = self.received / elapsed if elapsed > 0 else LARGEST_READ
        self.size = max(1, min(LARGEST_READ, int(rate / READS_PER_SECOND), 2 * self.received))

    def readline(self, size: int = -1) -> bytes:
        """Not used by the service (its import reads blocks); refused rather than unbounded."""
        raise NotImplementedError("read the body in blocks")
