"""Read the service's configuration from the environment, once."""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# RFC 6750's token68 characters, and enough of them to resist guessing.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_LENGTH = 16


class ConfigError(Exception):
    """A configuration value that the service cannot run with."""


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    # One worker process per core; a few threads each overlap the waits on Redis (more
    # threads only fight over the GIL: 8 cost more CPU per request and a worse p99 than 4).
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 16))
    threads: int = 4
    db_host: str | None = None
    db_port: int = 6379
    db_username: str | None = None
    db_password: str | None = None
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
    listed = [token.strip() for token in (_get(env, "API_TOKENS") or "").split(",")]
    tokens = _check_tokens([token for token in listed if token], "API_TOKENS")
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
    return Config(
        host=_get(env, "HOST") or Config.host,
        port=_integer(env, "PORT", Config.port, 1, 65535),
        workers=_integer(env, "WORKERS", Config().workers, 1, 64),
        threads=_integer(env, "THREADS", Config.threads, 1, 256),
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
        api_tokens=_tokens(env),
        metrics=_flag(env, "METRICS", Config.metrics),
        metrics_tokens=_check_tokens([token.strip() for token in
                                      (_get(env, "METRICS_TOKEN") or "").split(",")
                                      if token.strip()], "METRICS_TOKEN"),
        granian_metrics_port=_integer(env, "GRANIAN_METRICS_PORT", Config.granian_metrics_port,
                                      0, 65535),
    )
