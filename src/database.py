"""Build the Redis Cluster client the service talks to, and ride out its brief outages.

The embedded database is no cluster: the service talks to it with a plain client on its unix
socket, built with the same options (the storage and listing code serve either).

Retries. redis-py's cluster client refreshes its topology after a connection error but
retries without backoff, so a failover (several seconds) surfaces as errors. `Retrying`
runs a whole store operation again, with exponential backoff and jitter, until it succeeds
or DBRETRYSECONDS pass; then the last error goes up and the client gets a 503. Only
operations that end in the same state however often they run may be retried, because a
timed-out or disconnected command may still have been applied:
- reads (HGETALL, SCAN pages) change nothing;
- HSET and HDEL of the same fields with the same values, alone or in one MULTI/EXEC,
  leave the same hash, so a merge (PUT) applied twice is a merge applied once;
- DEL of a key that is already gone is still a success (DELETE answers 204 either way);
- a create draws its uuid before the first attempt, so a retry writes the same new key
  and never makes a second customer;
- a write that reached its primary but too few replicas (DBWAITREPLICAS) is one of the
  above, so it is applied again and waited for again.
A conditional write (WATCH, check, MULTI/EXEC) must retry the whole check-and-write: if a
lost reply hid a successful EXEC, the retry sees the new version and reports a conflict,
never a double write. DBWAITREPLICAS covers every write: unconditional ones through
write_and_wait, conditional ones by a WAIT after their EXEC on the same connection; a
conditional write that too few replicas confirmed is not retried (the retry would take its
own write for another writer's) but answered 503 at once. Errors that waiting cannot mend
(a wrong password, a missing ACL permission, a certificate that fails verification) are not
retried.
"""

import functools
import logging
import random
import threading
import time

import tenacity
from redis import Redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

import metrics

log = logging.getLogger(__name__)

# Errors that a failover, a resharding or a restart cause and that go away by themselves.
TRANSIENT = (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.RedisClusterException,
             rx.TryAgainError, rx.ReadOnlyError, rx.AskError)
# Errors of configuration: retrying only delays the 503 that names them.
PERMANENT = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)
FIRST_BACKOFF_SECONDS = 0.05
PERMANENT_WORDS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "NOAUTH", "WRONGPASS")


class ReplicasBehind(rx.RedisError):
    """A write reached its primary but not DBWAITREPLICAS replicas in time: not acknowledged."""


class LazyCluster:
    """A RedisCluster connecting on first use, so the service starts while the database is down."""

    def __init__(self, **options):
        self._options = options
        self._client = None
        self._lock = threading.Lock()

    def client(self) -> RedisCluster:
        """Return the connected client, connecting now if needed (raises while it is down)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = RedisCluster(**self._options)
                    log.info("connected to the database at %s:%s",
                             self._options["host"], self._options["port"])
        return self._client

    def __getattr__(self, name):
        return getattr(self.client(), name)

    def refresh(self) -> None:
        """Relearn which node serves which slots, if connected; failures wait for the next call."""
        if self._client is not None:
            try:
                self._client.nodes_manager.initialize()
            except TRANSIENT:
                pass

    def close(self) -> None:
        """Close every connection of the client, if it ever connected."""
        if self._client is not None:
            self._client.close()


def connect(config, max_connections=None, credential_provider=None) -> LazyCluster | Redis:
    """Return a cluster client for the configured database, or a plain one on its unix socket."""
    options = {
        "username": config.db_username,
        "password": config.db_password,
        "decode_responses": True,
        # Bytes that are not UTF-8 (another program's) read as surrogates instead of failing
        # the reply; they are never written back (storage.valid_id, representation.dumps).
        "encoding_errors": "surrogateescape",
        # RESP2: every engine MemoryDB and ElastiCache run speaks it, and hiredis builds its
        # flat lists several times faster than RESP3's maps (listing reads thousands of hashes).
        "protocol": 2,
        "socket_timeout": config.db_timeout,
        "socket_connect_timeout": config.db_timeout,
        # Every thread may hold one connection per node, plus the readiness check's.
        "max_connections": max_connections or max(64, 2 * config.threads),
        # One retry follows a topology change; waiting with backoff is Retrying's job.
        "retry": Retry(NoBackoff(), 1),
    }
    if config.db_socket:
        # Connects on first use too, so the service starts (and answers 503) while it is down.
        return Redis(unix_socket_path=config.db_socket, **options)
    options.update(host=config.db_host, port=config.db_port)
    if credential_provider is not None:
        options.update(username=None, password=None, credential_provider=credential_provider)
    if config.db_tls:
        options["ssl"] = True
        options["ssl_cert_reqs"] = "required"
        if config.db_ca_cert:
            options["ssl_ca_certs"] = config.db_ca_cert
    return LazyCluster(**options)


def is_transient(error: BaseException) -> bool:
    """Tell whether an error may go away by waiting (see the module's docstring)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    if any(isinstance(link, PERMANENT) for link in chain):
        return False
    if any(word in str(link) for link in chain for word in PERMANENT_WORDS):
        return False
    return isinstance(error, TRANSIENT + (ReplicasBehind,))


def _relearn(redis, error: BaseException) -> None:
    """Relearn the cluster's slots before the next attempt of a call that failed with error."""
    log.debug("database call failed (%s); retrying", error)
    if isinstance(redis, LazyCluster):
        redis.refresh()


def _counted(function, *args, **kwargs):
    """Return function(*args, **kwargs), counting its database error if it fails."""
    try:
        return function(*args, **kwargs)
    except rx.RedisError as error:
        metrics.database_error(error)
        raise


class Retrying:
    """Call a function again while the database is briefly unavailable, for at most `seconds`.

    Once a call has run out of time, the database is taken as down: later calls try once
    and fail at once, leaving the service's threads free, until one call succeeds again.
    """

    def __init__(self, redis, seconds: float):
        self.down = threading.Event()
        self.seconds = seconds
        self._redis = redis
        # Its stop, what remains of `seconds` after the first attempt, is set per call.
        self._policy = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.1),
            before_sleep=lambda state: _relearn(redis, state.outcome.exception()),
            reraise=True,
        )

    def __call__(self, function, *args, **kwargs):
        """Return function(*args, **kwargs), retried as the class says."""
        started = time.monotonic()
        try:
            # The first attempt skips tenacity's bookkeeping (about 20 us a call): most succeed.
            result = function(*args, **kwargs)
        except Exception as error:
            if isinstance(error, rx.RedisError):
                metrics.database_error(error)
            if not is_transient(error) or self.down.is_set():
                self._went_down(error)
                raise
            result = self._retry(started, error, function, *args, **kwargs)
        if self.down.is_set():
            self.down.clear()
            log.info("database back: retrying brief outages again")
        return result

    def _retry(self, started: float, error: Exception, function, *args, **kwargs):
        """Run function again with backoff for what remains of the budget started then."""
        remaining = self.seconds - (time.monotonic() - started)
        if remaining <= 0:
            self._went_down(error)
            raise error
        metrics.operation_retried()
        _relearn(self._redis, error)
        time.sleep(FIRST_BACKOFF_SECONDS * (1 + random.random()))
        policy = self._policy.copy(
            stop=tenacity.stop_before_delay(remaining) | tenacity.stop_when_event_set(self.down))
        try:
            return policy(_counted, function, *args, **kwargs)
        except Exception as error:
            self._went_down(error)
            raise

    def _went_down(self, error: Exception) -> None:
        """Take the database as down after a transient error that outlasted the retries."""
        if is_transient(error) and not self.down.is_set():
            self.down.set()
            log.warning("database down: answering 503 at once until it is back (%s: %s)",
                        type(error).__name__, error)


def retried(method):
    """Run a store method under its store's Retrying policy; the method must be retry-safe."""
    @functools.wraps(method)
    def run(store, *args, **kwargs):
        return store.retrying(method, store, *args, **kwargs)
    return run


def primary_of(redis, key: str):
    """Return a plain client of the primary that owns key (the client itself when not a cluster)."""
    if hasattr(redis, "get_node_from_key"):
        return redis.get_redis_connection(redis.get_node_from_key(key))
    return redis


def on_primary(redis, key: str, *command):
    """Run a command on key's primary directly, through the cluster client if moved.

    redis-py's cluster routing and its per-command wrapping cost more than the round trip
    (85 us against 40 us of CPU for an HGETALL, measured), so the command goes over a
    connection of the primary's pool. The slot table is current but after a resharding, which
    answers MOVED or ASK: the cluster client then follows the redirection and learns the new
    owner for the calls after. The reply is raw: HGETALL is a flat list in RESP2, a dict in RESP3.
    """
    pool = primary_of(redis, key).connection_pool
    connection = pool.get_connection()
    try:
        connection.send_command(*command)
        reply = connection.read_response()
    except rx.ResponseError as error:
        reply = error  # a whole reply: the connection can serve the next command
    except BaseException:
        # A reply may still be on its way: the connection must not serve another command.
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    if isinstance(reply, rx.AskError):
        return redis.execute_command(*command)
    if isinstance(reply, rx.ResponseError):
        raise reply
    return reply


def write_and_wait(redis, key: str, commands: list, replicas: int, timeout: float) -> list:
    """Apply commands on key in one MULTI/EXEC, then WAIT on the same connection for replicas."""
    pipe = primary_of(redis, key).pipeline(transaction=False)
    # WAIT counts the writes of its own connection, so it must follow them on one connection;
    # redis-py's cluster client would send a bare WAIT to an arbitrary node.
    pipe.execute_command("MULTI")
    for command in commands:
        pipe.execute_command(*command)
    pipe.execute_command("EXEC")
    pipe.execute_command("WAIT", replicas, int(timeout * 1000))
    *_, results, acknowledged = pipe.execute()
    for result in results:
        if isinstance(result, Exception):
            raise result
    if acknowledged < replicas:
        raise ReplicasBehind(f"{acknowledged} of {replicas} replicas confirmed the write to {key}")
    return results
