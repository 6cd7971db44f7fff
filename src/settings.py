"""Read the service's configuration from the environment, once."""

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A configuration value that the service cannot run with."""


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    # One worker process per core; a few threads each overlap the waits on Redis.
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 16))
    threads: int = 8
    db_host: str | None = None
    db_port: int = 6379
    db_username: str | None = None
    db_password: str | None = None
    db_tls: bool = False
    db_ca_cert: str | None = None
    db_timeout: float = 2.0
    max_body_bytes: int = 1024 * 1024
    data_dir: str = str(PROJECT_ROOT / "data")
    embedded_port: int = 0
    redis_server: str | None = None
    log_level: str = "INFO"

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


def _number(env, name, default):
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 300:
        raise ConfigError(f"{name} must be above 0 and at most 300 seconds, got {raw}")
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
        max_body_bytes=_integer(env, "MAX_BODY_BYTES", Config.max_body_bytes, 1, 2**31),
        data_dir=_get(env, "DATA_DIR") or Config.data_dir,
        embedded_port=_integer(env, "EMBEDDED_PORT", Config.embedded_port, 0, 65535),
        redis_server=redis_server,
        log_level=log_level,
    )
