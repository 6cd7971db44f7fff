"""Know which database nodes are down, so that requests fail at once instead of queueing on them.

A paused or blackholed node answers nothing: every command sent to it waits DBTIMEOUT, and
redis-py's cluster client, on such an error, relearns the layout node after node under its
locks. With every thread of a worker waiting so, even /healthz waited its turn. So:
- a node that failed a connect or a command is down: requests for it get NodeDown (a 503) at
  once, without a socket or a lock, until a probe of the keeper (LazyCluster's background
  thread) finds it answering again, or the layout moves its slots to another node;
- waiting of any kind in a request (a retry's backoff) takes one of a few permits, taken
  without blocking: the other threads answer at once, so most threads stay free;
- waiting for a node down ends DBRETRYSECONDS after it went down, whenever the request came:
  requests that queued while the threads were held at the outage's start do not wait more.
"""

import logging
import threading
import time

from redis import exceptions as rx

log = logging.getLogger(__name__)


class NodeDown(rx.ConnectionError):
    """A node known to be down, not tried: the request answers 503 at once."""


class Outages:
    """The nodes known to be down, and the permits to wait for the database."""

    def __init__(self, waiting_threads: int = 1):
        self._down: dict[str, tuple[float, str]] = {}  # name: since when, and why
        self._lock = threading.Lock()
        self._permits = threading.BoundedSemaphore(max(1, waiting_threads))
        self._local = threading.local()
        # Set when a node goes down: the keeper probes it and relearns the layout now.
        self.changed = threading.Event()

    def begin(self) -> None:
        """Start an attempt in this thread: it has used no node yet."""
        self._local.node = None

    def use(self, name: str) -> None:
        """Note that this thread's command goes to node name; raise NodeDown if it is down."""
        self._local.node = name
        if name in self._down:
            since, reason = self._down.get(name, (time.monotonic(), "back"))
            raise NodeDown(f"{name} is down since {time.monotonic() - since:.1f} s: {reason}")

    def down_since(self) -> float | None:
        """Return since when (monotonic) the node this thread used last is down, if it is."""
        name = getattr(self._local, "node", None)
        return self._down.get(name, (None,))[0] if name else None

    def is_down(self, name: str) -> bool:
        """Tell whether node name is known to be down."""
        return name in self._down

    def down(self) -> list[str]:
        """Return the names of the nodes known to be down."""
        return list(self._down)

    def failed(self, error: BaseException, name: str | None = None, always=False) -> None:
        """Take node name (by default, the last this thread used) as down after error.

        Only a connection's failure counts, unless always (the keeper's failed connect).
        """
        name = name or getattr(self._local, "node", None)
        if name is None or isinstance(error, NodeDown):
            return
        if not (always or isinstance(error, rx.ConnectionError | rx.TimeoutError)):
            return
        reason = f"{type(error).__name__}: {error}"
        with self._lock:
            if name in self._down:
                self._down[name] = (self._down[name][0], reason)
                return
            self._down[name] = (time.monotonic(), reason)
        self.changed.set()
        log.warning("database node %s down: answering 503 at once for its keys until it is "
                    "back (%s: %s)", name, type(error).__name__, error)

    def back(self, name: str) -> None:
        """Take node name as up again."""
        with self._lock:
            was = self._down.pop(name, None)
        if was is not None:
            log.info("database node %s back after %.1f s", name, time.monotonic() - was[0])

    def forget(self, names) -> None:
        """Drop nodes that are no longer in the cluster's layout."""
        with self._lock:
            for name in names:
                self._down.pop(name, None)

    def try_wait(self) -> bool:
        """Take a permit to wait for the database, if one is free now (give it back with done)."""
        return self._permits.acquire(blocking=False)

    def done_waiting(self) -> None:
        """Give back a permit taken by try_wait."""
        self._permits.release()
