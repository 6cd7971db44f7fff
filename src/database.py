"""Build the Redis Cluster client the service talks to."""

import logging
import threading

from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

log = logging.getLogger(__name__)


class LazyCluster:
    """A RedisCluster client that connects on first use, so the service starts while the database is down."""

    def __init__(self, **options):
        self._options = options
        self._client = None
        self._lock = threading.Lock()

    def client(self) -> RedisCluster:
        """Return the connected client, connecting now if needed (raises while the database is down)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = RedisCluster(**self._options)
                    log.info("connected to the database at %s:%s",
                             self._options["host"], self._options["port"])
        return self._client

    def __getattr__(self, name):
        return getattr(self.client(), name)

    def close(self) -> None:
        """Close every connection of the client, if it ever connected."""
        if self._client is not None:
            self._client.close()


def connect(config, max_connections=64) -> LazyCluster:
    """Return a cluster client for the configured database."""
    options = {
        "host": config.db_host,
        "port": config.db_port,
        "username": config.db_username,
        "password": config.db_password,
        "decode_responses": True,
        "socket_timeout": config.db_timeout,
        "socket_connect_timeout": config.db_timeout,
        "max_connections": max_connections,
        # One retry follows a topology change; longer waits belong to the caller.
        "retry": Retry(NoBackoff(), 1),
    }
    if config.db_tls:
        options["ssl"] = True
        options["ssl_cert_reqs"] = "required"
        if config.db_ca_cert:
            options["ssl_ca_certs"] = config.db_ca_cert
    return LazyCluster(**options)
