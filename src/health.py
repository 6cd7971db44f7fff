"""Health checks for load balancers and orchestrators: alive (/healthz) and ready (/readyz)."""

import logging

from redis import exceptions as rx
from redis.cluster import RedisCluster

from database import UNAVAILABLE, LazyCluster, Refusing, classified
from errors import RETRY_AFTER_SECONDS

log = logging.getLogger(__name__)


def database_problem(redis) -> str | None:
    """Return what keeps the database from serving, or None when every primary is ok."""
    try:
        if not isinstance(redis, LazyCluster | RedisCluster):
            redis.ping()
            return None
        outages = getattr(redis, "outages", None)
        primaries = redis.get_primaries()
        down = [node.name for node in primaries if outages and outages.is_down(node.name)]
        if down:
            return f"database unreachable: primary {', '.join(down)} down"
        for node in primaries:
            try:
                state = redis.get_redis_connection(node).cluster("info").get("cluster_state")
            except UNAVAILABLE as error:
                if outages:
                    outages.failed(error, node.name)
                raise
            if state != "ok":
                return f"cluster_state is {state} on {node.name}"
    except UNAVAILABLE as error:
        return f"database unreachable: {type(error).__name__}: {error}"
    except rx.ResponseError as error:
        refusing = classified(error)  # BUSY, or MISCONF for a PING
        if not isinstance(refusing, Refusing):
            raise
        return f"database refusing: {refusing.reason}: {refusing}"
    return None


def register(app, redis, trusted) -> None:
    """Add GET /healthz and GET /readyz; trusted() tells whether a request may see why not ready."""

    @app.get("/healthz")
    def healthz():
        """Answer 200 while the process serves requests; never asks the database."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """Answer 200 when the database is reachable and its cluster ok, else 503 (why: logged)."""
        problem = database_problem(redis)
        if problem:
            log.warning("not ready: %s", problem)
            retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            # A node's address and a driver's error are for the operator, not for anyone.
            message = f"not ready: {problem}" if trusted() else "not ready"
            return {"message": message}, 503, retry
        return {"status": "ready"}
