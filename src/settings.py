"""Read the service's configuration from the environment, once."""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# RFC 6750's token68 characters, and enough of them to resist guessing.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_LENGTH = 16


def usable_cpus() -> int:
    """Return how many CPUs this process may run on (all of the machine's where unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ConfigError(Exception):
    """A configuration value that the service cannot run with."""


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    # One worker process per CPU it may use (a container's cpuset, taskset); a few threads
    # each overlap the waits on Redis (more threads only fight over the GIL: 8 cost more CPU
    # per request and a worse p99 than 4).
    workers: int = field(default_factory=lambda: min(usable_cpus(), 16))
    # With one worker for each CPU the service may use, each on its own (worker_cpus.py).
    pin_workers: bool = True
    threads: int = 4
    db_host: str | None = None
    db_port: int = 6379
    db_username: str | None = None
    db_password: str | None = field(default=None, repr=False)
    db_tls: bool = False
    db_ca_cert: str | None = None
    db_timeout: float = 2.0
    db_retry_seconds: float = 4.0
    db_wait_replicas: int = 0
    max_body_bytes: int = 1024 * 1024
    data_dir: str = str(PROJECT_ROOT / "data")
    embedded_port: int = 0
    redis_server: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_fields: int = 1000
    auth: str = "tokens"
    db_auth: str = "password"
    db_cluster: str | None = None
    aws_region: str | None = None
    # A unix socket to reach a standalone database on instead of DBHOST (the embedded one's).
    db_socket: str | None = None
    # Slow and idle clients (docs/slow-clients.md): seconds a connection may move no byte,
    # bytes a second a client must read while a response waits for it, seconds a whole
    # response may take to send, and the same two for a request body.
    idle_timeout: float = 20.0
    min_send_rate: int = 4096
    send_timeout: float = 300.0
    min_body_rate: int = 4096
    body_timeout: float = 30.0
    idempotency_ttl_seconds: int = 86400
    max_import_bytes: int = 2**30
    metrics: bool = True
    # Tokens that open GET /metrics only (API tokens open it too), for a scraper.
    metrics_tokens: tuple[str, ...] = field(default=(), repr=False)
    # granian's own Prometheus exporter (workers, connections, threads), on HOST; 0: off.
    granian_metrics_port: int = 0

    @property
    def embedded(self) -> bool:
        """Whether the service runs its own local Redis instead of a configured one."""
        return not self.db_host


def _get(env, *names):
    """Return the first of the names that is set and not empty."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _integer(env, name, default, low, high, *aliases):
    raw = _get(env, name, *aliases)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(env, name, default, zero_allowed=False):
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (0 <= value if zero_allowed else 0 < value) or value > 300:
        lowest = "at least 0" if zero_allowed else "above 0"
        raise ConfigError(f"{name} must be {lowest} and at most 300 seconds, got {raw}")
    return value


def _flag(env, name, default):
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _check_tokens(tokens: list, source: str) -> tuple[str, ...]:
    for number, token in enumerate(tokens, 1):
        # Never echo a token: name only where it is.
        if not TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(f"{source}: token {number} has characters other than "
                              "letters, digits and - . _ ~ + / (then =)")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{source}: token {number} is shorter than "
                              f"{MIN_TOKEN_LENGTH} characters")
    return tuple(tokens)


def _tokens(env) -> tuple[str, ...]:
    """Read API_TOKENS (comma-separated) and the file named by API_TOKENS_FILE (one a line)."""
    raw = env.get("API_TOKENS", "")
    listed = [token.strip() for token in raw.split(",") if token.strip()]
    if raw and not listed:
        # Left as it is, a stray comma or space would turn authentication off.
        raise ConfigError("API_TOKENS is set but holds no token: give one or more tokens "
                          "separated by commas, or leave it empty")
    tokens = _check_tokens(listed, "API_TOKENS")
    path = _get(env, "API_TOKENS_FILE")
    if path is None:
        return tokens
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"API_TOKENS_FILE cannot be read: {path}: "
                          f"{getattr(error, 'strerror', None) or 'not UTF-8 text'}") from None
    in_file = [line.strip() for line in lines
               if line.strip() and not line.lstrip().startswith("#")]
    if not in_file:
        raise ConfigError(f"API_TOKENS_FILE holds no token: {path}")
    return tokens + _check_tokens(in_file, "API_TOKENS_FILE")


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _auth(env, host: str, tokens: tuple[str, ...]) -> str:
    """Read AUTH and check it against the tokens and the address the service listens on."""
    auth = (_get(env, "AUTH") or Config.auth).lower()
    if auth not in ("tokens", "none"):
        raise ConfigError(f"AUTH must be tokens or none, got {auth!r}")
    if auth == "none" and tokens:
        raise ConfigError("AUTH=none serves without tokens, yet API_TOKENS or API_TOKENS_FILE "
                          "holds some: remove one or the other")
    if auth == "tokens" and not tokens and not is_loopback(host):
        raise ConfigError(f"HOST={host} is reachable from other machines but no API token is "
                          "set: add API_TOKENS=<token>[,<token>...] or API_TOKENS_FILE=<file> "
                          "(a token: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
                          "), or set AUTH=none to serve without tokens where only trusted "
                          "clients can connect")
    return auth


def _iam(env, db_host) -> dict:
    """Read DBAUTH and, when it is iam, the cluster and region the tokens are signed for."""
    auth = (_get(env, "DBAUTH", "DB_AUTH") or Config.db_auth).lower()
    if auth not in ("password", "iam"):
        raise ConfigError(f"DBAUTH must be password or iam, got {auth!r}")
    if auth == "password":
        return {}
    settings = {"db_auth": auth, "db_cluster": _get(env, "DBCLUSTER", "DB_CLUSTER"),
                "aws_region": _get(env, "AWS_REGION", "AWS_DEFAULT_REGION")}
    missing = [name for name, value in (("DBHOST", db_host),
                                        ("DBUSERNAME", _get(env, "DBUSERNAME", "DB_USERNAME")),
                                        ("DBCLUSTER", settings["db_cluster"]),
                                        ("AWS_REGION", settings["aws_region"])) if not value]
    if missing:
        raise ConfigError(f"DBAUTH=iam needs {', '.join(missing)} set")
    if _get(env, "DBPASSWORD", "DB_PASSWORD"):
        raise ConfigError("DBAUTH=iam signs its own tokens: leave DBPASSWORD empty")
    if not _flag(env, "DBTLS", True):
        raise ConfigError("DBAUTH=iam needs DBTLS on: the token must not cross the network "
                          "in clear text")
    return settings


def load_config(env=None) -> Config:
    """Build the configuration from environment variables, or raise ConfigError."""
    env = os.environ if env is None else env
    db_host = _get(env, "DBHOST", "DB_HOST")
    ca_cert = _get(env, "DBCACERT", "DB_CA_CERT")
    if ca_cert and not Path(ca_cert).is_file():
        raise ConfigError(f"DBCACERT names no readable file: {ca_cert}")
    redis_server = _get(env, "REDIS_SERVER")
    if redis_server and not os.access(redis_server, os.X_OK):
        raise ConfigError(f"REDIS_SERVER is not an executable file: {redis_server}")
    log_level = (_get(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    log_format = (_get(env, "LOG_FORMAT") or Config.log_format).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be text or json, got {log_format!r}")
    host = _get(env, "HOST") or Config.host
    tokens = _tokens(env)
    return Config(
        host=host,
        port=_integer(env, "PORT", Config.port, 1, 65535),
        workers=_integer(env, "WORKERS", Config().workers, 1, 64),
        threads=_integer(env, "THREADS", Config.threads, 1, 256),
        pin_workers=_flag(env, "PIN_WORKERS", Config.pin_workers),
        db_host=db_host,
        db_port=_integer(env, "DBPORT", Config.db_port, 1, 65535, "DB_PORT"),
        db_username=_get(env, "DBUSERNAME", "DB_USERNAME"),
        db_password=_get(env, "DBPASSWORD", "DB_PASSWORD"),
        db_tls=_flag(env, "DBTLS", bool(db_host)),
        db_ca_cert=ca_cert,
        db_timeout=_number(env, "DBTIMEOUT", Config.db_timeout),
        db_retry_seconds=_number(env, "DBRETRYSECONDS", Config.db_retry_seconds,
                                 zero_allowed=True),
        db_wait_replicas=_integer(env, "DBWAITREPLICAS", Config.db_wait_replicas, 0, 5),
        max_body_bytes=_integer(env, "MAX_BODY_BYTES", Config.max_body_bytes, 1, 2**31),
        data_dir=_get(env, "DATA_DIR") or Config.data_dir,
        embedded_port=_integer(env, "EMBEDDED_PORT", Config.embedded_port, 0, 65535),
        redis_server=redis_server,
        log_level=log_level,
        log_format=log_format,
        api_tokens=tokens,
        auth=_auth(env, host, tokens),
        max_fields=_integer(env, "MAX_FIELDS", Config.max_fields, 1, 100_000),
        **_iam(env, db_host),
        idle_timeout=_number(env, "IDLE_TIMEOUT", Config.idle_timeout),
        min_send_rate=_integer(env, "MIN_SEND_RATE", Config.min_send_rate, 0, 2**31),
        send_timeout=_number(env, "SEND_TIMEOUT", Config.send_timeout),
        min_body_rate=_integer(env, "MIN_BODY_RATE", Config.min_body_rate, 0, 2**31),
        body_timeout=_number(env, "BODY_TIMEOUT", Config.body_timeout),
        idempotency_ttl_seconds=_integer(env, "IDEMPOTENCY_TTL_SECONDS",
                                         Config.idempotency_ttl_seconds, 60, 365 * 86400),
        max_import_bytes=_integer(env, "MAX_IMPORT_BYTES", Config.max_import_bytes, 1, 2**40),
        metrics=_flag(env, "METRICS", Config.metrics),
        metrics_tokens=_check_tokens([token.strip() for token in
                                      (_get(env, "METRICS_TOKEN") or "").split(",")
                                      if token.strip()], "METRICS_TOKEN"),
        granian_metrics_port=_integer(env, "GRANIAN_METRICS_PORT", Config.granian_metrics_port,
                                      0, 65535),
    )
