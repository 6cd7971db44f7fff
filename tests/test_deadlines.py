"""The slots that bound the requests running Python at once in a worker."""

import io
import json
import threading
import time

import fakeredis

from deadlines import Deadlines, Slots
from mixed_load import wait_until
from server import create_app
from settings import Config


def test_a_freed_slot_goes_to_the_longest_waiter():
    slots, order = Slots(1), []

    def take(number):
        with slots:
            order.append(number)

    slots.__enter__()
    threads = []
    for number in range(4):
        threads.append(threading.Thread(target=take, args=(number,)))
        threads[-1].start()
        wait_until(lambda count=number + 1: len(slots._waiters) == count, 5)
    slots.__exit__(None, None, None)
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3]


def test_slots_let_count_holders_in_at_once_and_no_more():
    slots, inside, most = Slots(3), [], []
    lock, release = threading.Lock(), threading.Event()

    def hold():
        with slots:
            with lock:
                inside.append(1)
                most.append(len(inside))
            release.wait(5)
            with lock:
                inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(inside) == 3 and len(slots._waiters) == 2, 5)
    release.set()
    for thread in threads:
        thread.join(5)
    assert max(most) == 3
    assert len(most) == 5


class Trickle:
    """A request body that arrives a few bytes at a time, slowly."""

    def __init__(self, body: bytes, piece: int, pause: float):
        self.body, self.piece, self.pause = body, piece, pause

    def read(self, size: int = -1) -> bytes:
        time.sleep(self.pause)
        size = self.piece if size < 0 else min(size, self.piece)
        taken, self.body = self.body[:size], self.body[size:]
        return taken


def test_an_import_that_trickles_below_min_body_rate_is_408_saying_what_was_applied():
    config = Config(min_body_rate=1000)
    lines = b"".join(b'{"id": "c%d", "n": %d}\n' % (n, n) for n in range(400))
    app = Deadlines(create_app(config, fakeredis.FakeRedis(decode_responses=True)), config)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/customers",
               "CONTENT_TYPE": "application/x-ndjson", "CONTENT_LENGTH": str(len(lines)),
               "wsgi.input": Trickle(lines, 2500, 0.0)}
    # 2,500 bytes at once, then 50 bytes a second: under 1,000 once the grace is over.
    status, body = run_wsgi(app, environ, slow_after=2500)
    assert status.startswith("408")
    assert body["message"].startswith("the import came too slowly (MIN_BODY_RATE): ")
    assert "applied" in body["message"] or "created" in body["message"], body


def run_wsgi(app, environ, slow_after: int):
    """Call a WSGI app the way granian does; the body slows down after slow_after bytes."""
    base = {"SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.errors": io.StringIO(), "QUERY_STRING": ""}
    body = environ["wsgi.input"].body
    environ["wsgi.input"] = Trickle(body[:slow_after], 2500, 0.0)
    slow = Trickle(body[slow_after:], 50, 1.0)
    fast = environ["wsgi.input"]

    class Both:
        def read(self, size=-1):
            return fast.read(size) or slow.read(size)

    environ["wsgi.input"] = Both()
    answer = {}

    def start_response(status, headers):
        answer["status"] = status

    chunks = b"".join(app({**base, **environ}, start_response))
    return answer["status"], json.loads(chunks)


class Gate:
    """A request body that waits at a gate before its last byte."""

    def __init__(self, body: bytes):
        self.body, self.opened, self.waiting = body, threading.Event(), threading.Event()

    def read(self, size: int = -1) -> bytes:
        if len(self.body) <= 1:
            self.waiting.set()
            self.opened.wait(10)
        # All but the last byte at first; the last one once the gate opens.
        count = max(1, len(self.body) - 1) if size < 0 else min(size, max(1, len(self.body) - 1))
        taken, self.body = self.body[:count], self.body[count:]
        return taken


def test_a_second_import_in_one_worker_is_429_while_others_are_served():
    config = Config()
    app = Deadlines(create_app(config, fakeredis.FakeRedis(decode_responses=True)), config)
    base = {"SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.errors": io.StringIO(), "QUERY_STRING": ""}
    line = b'{"id": "first", "n": 1}\n'
    first = Gate(line)
    answers = {}

    def call(name, environ):
        def start_response(status, headers):
            answers[name] = (status, dict(headers))
        answers[name + " body"] = json.loads(b"".join(app({**base, **environ}, start_response)))

    def importing(body, name):
        call(name, {"REQUEST_METHOD": "POST", "PATH_INFO": "/customers",
                    "CONTENT_TYPE": "application/x-ndjson", "CONTENT_LENGTH": str(len(line)),
                    "wsgi.input": body})

    running = threading.Thread(target=importing, args=(first, "first"))
    running.start()
    assert first.waiting.wait(10)
    importing(io.BytesIO(line.replace(b"first", b"second")), "second")
    call("get", {"REQUEST_METHOD": "GET", "PATH_INFO": "/customers/nobody"})
    first.opened.set()
    running.join(10)
    importing(io.BytesIO(line.replace(b"first", b"third")), "third")

    status, headers = answers["second"]
    assert status == "429 Too Many Requests"
    assert headers["Retry-After"] == "2" and headers["Connection"] == "close"
    assert len(headers["X-Request-ID"]) == 32
    assert answers["second body"]["message"].startswith("imports run 1 at a time in each worker")
    assert answers["get"][0].startswith("404")  # a slot was free for everyone else
    assert answers["first"][0] == answers["third"][0] == "200 OK"
    assert answers["first body"]["created"] == answers["third body"]["created"] == 1
