"""Build the Redis Cluster client the service talks to, and ride out its brief outages.

The embedded database is no cluster: the service talks to it with a plain client on its unix
socket, built with the same options (the storage and listing code serve either).

Retries. redis-py's cluster client refreshes its topology after a connection error but
retries without backoff, so a failover (several seconds) surfaces as errors. `Retrying`
runs a whole store operation again, with exponential backoff and jitter, until it succeeds
or DBRETRYSECONDS pass; then the last error goes up and the client gets a 503. A node that
does not answer is not waited for by every request in turn (see outages.py). Only
operations that end in the same state however often they run may be retried, because a
timed-out or disconnected command may still have been applied:
- reads (HGETALL, SCAN pages) change nothing;
- HSET and HDEL of the same fields with the same values, alone or in one MULTI/EXEC,
  leave the same hash, so a merge (PUT) applied twice is a merge applied once;
- DEL of a key that is already gone is still a success (DELETE answers 204 either way);
- a create draws its uuid before the first attempt, so a retry writes the same new key
  and never makes a second customer; with an Idempotency-Key (idempotency.py), the retry
  finds the key's record naming that uuid and answers as the create, not as a replay;
- an NDJSON import chunk (bulk_merge.py) is merges and creates of the kinds above, so the
  whole chunk is sent again; its new customers' ids are drawn before the first attempt;
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
import re
import threading
import time

import tenacity
from redis import Redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

import metrics
from outages import NodeDown, Outages

log = logging.getLogger(__name__)

# Errors that a failover, a resharding or a restart cause and that go away by themselves.
TRANSIENT = (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.RedisClusterException,
             rx.TryAgainError, rx.ReadOnlyError, rx.AskError)
# Errors of configuration: retrying only delays the 503 that names them.
PERMANENT = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)
FIRST_BACKOFF_SECONDS = 0.05
# How often the keeper tries again to connect, probes the nodes down and relearns the layout.
KEEPER_PAUSE_SECONDS = 0.5
PERMANENT_WORDS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "NOAUTH", "WRONGPASS")


# Replies of a database that answers but refuses commands for now, by their first word: what
# each means for a client. Waiting may mend them, but not within a request: answered 503 at once.
REFUSALS = {
    "OOM": "it is full (maxmemory reached) and takes no writes",
    "BUSY": "it is busy running a script",
    "MISCONF": "it takes no writes: it could not save to disk",
    "NOREPLICAS": "it takes no writes: too few replicas are in sync",
}

SCRIPT_ERROR = re.compile(r"Error running script \(call to [^)]*\): .*?: -([A-Z]+) ")


class Refusing(rx.ResponseError):
    """The database answers, but refuses commands for now (one of REFUSALS)."""

    def __init__(self, code: str, reply: str):
        super().__init__(reply)
        self.code = code

    @property
    def reason(self) -> str:
        """Say why, for a client."""
        return REFUSALS[self.code]


def classified(error: BaseException) -> BaseException:
    """Return a Refusing for an error reply that says the database refuses for now, else the
    error itself: redis-py gives most of them as a plain ResponseError."""
    if isinstance(error, Refusing) or not isinstance(error, rx.ResponseError):
        return error
    text = str(error)
    # A reply redis-py has a class for (OOM, and any it adds) loses its first word to
    # status_code; the others keep it.
    code = getattr(error, "status_code", None) or text.split(" ", 1)[0]
    # Redis 6.2 wraps what a script's command met in an ERR (redis-py drops the "ERR").
    if code == "Error" and (wrapped := SCRIPT_ERROR.match(text)):
        code = wrapped.group(1)
    if code not in REFUSALS:
        return error
    return Refusing(code, text if text.startswith(code) else f"{code} {text}")


class ReplicasBehind(rx.RedisError):
    """A write reached its primary but not DBWAITREPLICAS replicas in time: not acknowledged."""


class Unreplicated(rx.RedisError):
    """A conditional write reached its primary but too few replicas: not acknowledged."""


# What "the database is unavailable" means: it cannot answer now (a 503 with Retry-After), as
# opposed to a bug in a request. Waiting mends some (TRANSIENT), not others (PERMANENT).
UNAVAILABLE = TRANSIENT + PERMANENT + (rx.MasterDownError, rx.BusyLoadingError, ReplicasBehind,
                                       Unreplicated, Refusing)


def eviction_warning(policy: str | None) -> str | None:
    """Say what a primary's maxmemory-policy may do to the service's data when it is full."""
    if policy is None or policy == "noeviction":
        return None
    if policy.startswith("volatile-"):
        return ("idempotency records (which expire) can be evicted before their time: a POST "
                "retried with its Idempotency-Key could create a second customer")
    return "customers can be evicted: a write answered 201 or 204 could later vanish"


class LazyCluster:
    """A RedisCluster that a thread connects in the background, even while the database is down.

    That thread, the keeper, is the only one to wait on a node that does not answer: it
    connects, probes the nodes known down (see outages.py) until they answer, and relearns
    which node serves which slots while a node is down or a request asks it to, so that the
    keys of a failed primary reach its successor even when no other request succeeds.
    Requests never wait on its locks: they wait for its first connect (a connect and a read,
    two DBTIMEOUTs at most), then fail at once until it connects.
    """

    def __init__(self, outages: Outages | None = None, first_wait: float = 2.0, **options):
        self.outages = outages or Outages()
        self._options = options
        self._client = None
        self._startup = f"{options['host']}:{options['port']}"
        self._first_wait = first_wait
        self._tried = threading.Event()
        self._stopped = threading.Event()
        self._keeper = None
        self._keeper_lock = threading.Lock()
        self._probing = set()
        self._policies_read = set()

    def client(self) -> RedisCluster:
        """Return the connected client (raises NodeDown while the keeper cannot connect)."""
        client = self._client
        if client is not None:
            return client
        self._start_keeper()
        self.outages.use(self._startup)
        self._tried.wait(self._first_wait)
        if self._client is None:
            self.outages.use(self._startup)
            raise NodeDown(f"not yet connected to the database at {self._startup}")
        return self._client

    def __getattr__(self, name):
        return getattr(self.client(), name)

    def relearn(self) -> None:
        """Ask the keeper to relearn the cluster's layout now, without waiting for it."""
        self._start_keeper()
        self.outages.changed.set()

    def close(self) -> None:
        """Stop the keeper and close every connection of the client, if it ever connected."""
        self._stopped.set()
        self.outages.changed.set()
        if self._keeper is not None:
            self._keeper.join(5)
        if self._client is not None:
            self._client.close()

    def _start_keeper(self) -> None:
        if self._keeper is None:
            with self._keeper_lock:
                if self._keeper is None and not self._stopped.is_set():
                    self._keeper = threading.Thread(target=self._keep, name="database-keeper",
                                                    daemon=True)
                    self._keeper.start()

    def _keep(self) -> None:
        """Connect; then, whenever asked and while a node is down, probe and relearn."""
        while not self._stopped.is_set():
            self.outages.changed.clear()
            if self._client is None:
                self._connect()
            else:
                self._probe_down_nodes()
                self._relearn_layout()
                self._read_eviction_policies()  # of new primaries, and of those down before
            if self._client is None or self.outages.down():
                self._stopped.wait(KEEPER_PAUSE_SECONDS)
            else:
                self.outages.changed.wait()
                self._stopped.wait(KEEPER_PAUSE_SECONDS / 5)  # many asking: one relearning

    def _connect(self) -> None:
        try:
            client = RedisCluster(**self._options)
        except Exception as error:  # noqa: BLE001 - any failure is retried; requests get 503s
            self.outages.failed(error, self._startup, always=True)
        else:
            self._client = client
            self.outages.back(self._startup)
            log.info("connected to the database at %s", self._startup)
            # Before requests go ahead: its connections are then made while they wait, not
            # later beside theirs.
            self._read_eviction_policies()
        finally:
            self._tried.set()

    def _read_eviction_policies(self) -> None:
        """Warn, once a primary, when a full database may evict the service's keys."""
        for node in self._client.get_primaries():
            if node.name in self._policies_read or self.outages.is_down(node.name):
                continue
            try:
                memory = self._client.get_redis_connection(node).info("memory")
            except rx.NoPermissionError as error:
                self._policies_read.add(node.name)
                log.info("cannot read the maxmemory-policy of database node %s (%s): it should "
                         "be noeviction", node.name, error)
                continue
            except Exception as error:  # noqa: BLE001 - read again at the next round
                # A node that timed out is down: requests fail at once, and it is probed.
                self.outages.failed(error, node.name)
                log.debug("reading the maxmemory-policy of %s failed: %s", node.name, error)
                continue
            self._policies_read.add(node.name)
            policy = memory.get("maxmemory_policy")
            if warning := eviction_warning(policy):
                log.warning("database node %s has maxmemory-policy %s: when it is full, %s; "
                            "set it to noeviction", node.name, policy, warning)

    def _probe_down_nodes(self) -> None:
        """Ping each node known down, each in a thread of its own: paused ones take DBTIMEOUT."""
        gone = []
        for name in self.outages.down():
            node = self._client.get_node(node_name=name)
            if node is None:
                gone.append(name)
            elif name not in self._probing:
                self._probing.add(name)
                threading.Thread(target=self._probe, args=(name, node), daemon=True).start()
        self.outages.forget(gone)

    def _probe(self, name, node) -> None:
        try:
            self._client.get_redis_connection(node).ping()
        except Exception as error:  # noqa: BLE001 - still down, whatever the reason
            log.debug("database node %s still down: %s", name, error)
        else:
            self.outages.back(name)
        finally:
            self._probing.discard(name)

    def _relearn_layout(self) -> None:
        """Ask the nodes for the slots' owners, unless every node is down (none would answer)."""
        if all(self.outages.is_down(node.name) for node in self._client.get_nodes()):
            return
        try:
            self._client.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
        except Exception as error:  # noqa: BLE001 - the next round tries again
            log.debug("relearning the database's layout failed: %s", error)
            return
        known = {node.name for node in self._client.get_nodes()}
        self.outages.forget([name for name in self.outages.down() if name not in known])


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
    # Waiting in a request (a retry's backoff) takes one of these, leaving the other threads
    # of the worker free to answer what needs no waiting, /healthz first of all.
    outages = Outages(waiting_threads(config.threads))
    # A first connect takes a connect and a read: wait for it, but within a request's budget.
    first_wait = min(2 * config.db_timeout, config.db_retry_seconds + config.db_timeout)
    return LazyCluster(outages, first_wait, **options)


def waiting_threads(threads: int) -> int:
    """Return how many of a worker's threads may wait for the database at once: half."""
    return max(1, threads // 2)


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
    """Ask for the cluster's slots to be relearnt before the next attempt of a call that failed."""
    log.debug("database call failed (%s); retrying", error)
    if isinstance(redis, LazyCluster):
        redis.relearn()


class Retrying:
    """Call a function again while the database is briefly unavailable, for at most `seconds`.

    A node that fails a connect or a command is taken as down (see outages.py): calls for it
    fail at once until it answers again. Waiting between attempts takes one of a few permits;
    a call that finds none fails at once too, so that waiting calls cannot take every thread.
    """

    def __init__(self, redis, seconds: float, outages: Outages | None = None):
        self.seconds = seconds
        self._redis = redis
        self.outages = redis.outages if isinstance(redis, LazyCluster) else outages or Outages()
        # Its stop, what remains of `seconds` after the first attempt, is set per call.
        self._policy = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.1),
            before_sleep=lambda state: _relearn(redis, state.outcome.exception()),
            after=lambda state: self._failed(state.outcome.exception()),
            reraise=True,
        )

    def __call__(self, function, *args, **kwargs):
        """Return function(*args, **kwargs), retried as the class says."""
        started = time.monotonic()
        self.outages.begin()
        try:
            # The first attempt skips tenacity's bookkeeping (about 20 us a call): most succeed.
            return function(*args, **kwargs)
        except Exception as error:
            self._failed(error)
            if not is_transient(error):
                raise
            return self._retry(started, error, function, *args, **kwargs)

    def _retry(self, started: float, error: Exception, function, *args, **kwargs):
        """Run function again with backoff for what remains of the budget started then."""
        # Waiting for a node that is down is worth it while its outage is young (a failover).
        since = self.outages.down_since()
        deadline = min(started, since or started) + self.seconds
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self.outages.try_wait():
            raise error
        metrics.operation_retried()
        try:
            _relearn(self._redis, error)
            time.sleep(FIRST_BACKOFF_SECONDS * (1 + random.random()))
            policy = self._policy.copy(stop=tenacity.stop_before_delay(remaining))
            return policy(function, *args, **kwargs)
        finally:
            self.outages.done_waiting()

    def _failed(self, error: BaseException | None) -> None:
        """Take the node that the failed attempt used as down, if the error says so."""
        if error is not None:
            self.outages.failed(error)
            if isinstance(error, rx.RedisError):
                metrics.database_error(error)
            log.debug("database call failed: %s: %s", type(error).__name__, error)


def retried(method):
    """Run a store method under its store's Retrying policy; the method must be retry-safe."""
    @functools.wraps(method)
    def run(store, *args, **kwargs):
        return store.retrying(method, store, *args, **kwargs)
    return run


def primary_of(redis, key: str):
    """Return a plain client of the primary that owns key (the client itself when not a cluster).

    Raises NodeDown at once when that primary is known to be down.
    """
    if isinstance(redis, LazyCluster):
        node = redis.get_node_from_key(key)
        redis.outages.use(node.name)
        return redis.get_redis_connection(node)
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
        raise classified(reply)
    return reply


def run_script(redis, script: str, sha: str, keys: tuple, args: tuple, replicas: int = 0,
               timeout: float = 1.0, wrote=None):
    """EVALSHA script on the primary of keys[0] (all in its slot), then WAIT if replicas.

    A node that restarted, was promoted or was added has no scripts yet: the script is loaded
    there and run once more. wrote(result), when given, tells whether the script wrote: a
    result that wrote nothing needs no replica's confirmation.
    """
    command = ("EVALSHA", sha, len(keys), *keys, *args)
    for attempt in range(2):
        try:
            if replicas:
                return write_and_wait(redis, keys[0], [command], replicas, timeout, wrote)[0]
            return on_primary(redis, keys[0], *command)
        except rx.NoScriptError:
            if attempt:
                raise
            primary_of(redis, keys[0]).script_load(script)
    raise AssertionError("unreachable")


def write_and_wait(redis, key: str, commands: list, replicas: int, timeout: float,
                   wrote=None) -> list:
    """Apply commands on key in one MULTI/EXEC, then WAIT on the same connection for replicas
    (unless wrote(results) says that they wrote nothing)."""
    pipe = primary_of(redis, key).pipeline(transaction=False)
    # WAIT counts the writes of its own connection, so it must follow them on one connection;
    # redis-py's cluster client would send a bare WAIT to an arbitrary node.
    pipe.execute_command("MULTI")
    for command in commands:
        pipe.execute_command(*command)
    pipe.execute_command("EXEC")
    pipe.execute_command("WAIT", replicas, int(timeout * 1000))
    try:
        *_, results, acknowledged = pipe.execute()
    except rx.ResponseError as error:
        raise classified(error) from None
    for result in results:
        if isinstance(result, Exception):
            raise classified(result)
    if acknowledged < replicas and (wrote is None or wrote(results)):
        raise ReplicasBehind(f"{acknowledged} of {replicas} replicas confirmed the write to {key}")
    return results
