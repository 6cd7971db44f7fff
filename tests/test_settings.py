"""Configuration comes from the environment, with the original example's names."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from settings import Config, ConfigError, load_config

SRC = Path(__file__).resolve().parent.parent / "src"


def test_defaults_serve_on_loopback_with_the_embedded_database():
    config = load_config({})
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.embedded
    assert not config.db_tls


def test_workers_default_to_the_cpus_the_service_may_use_not_the_machines():
    # A container limited to some CPUs (docker --cpuset-cpus), as taskset limits this child.
    allowed = sorted(os.sched_getaffinity(0))
    script = "from settings import load_config; print(load_config({}).workers)"
    one = subprocess.run([sys.executable, "-c", script], cwd=SRC, capture_output=True,
                         text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, allowed[:1])).stdout
    assert int(one) == 1
    assert load_config({}).workers == min(len(allowed), 16)


def test_the_original_names_configure_the_database_with_tls_on():
    config = load_config({"DBHOST": "clustercfg.example", "DBPORT": "6380",
                          "DBUSERNAME": "app", "DBPASSWORD": "secret"})
    assert (config.db_host, config.db_port) == ("clustercfg.example", 6380)
    assert (config.db_username, config.db_password) == ("app", "secret")
    assert config.db_tls
    assert not config.embedded


def test_the_published_sample_names_work_too():
    config = load_config({"DB_HOST": "h", "DB_PORT": "7000", "DB_USERNAME": "u",
                          "DB_PASSWORD": "p"})
    assert (config.db_host, config.db_port, config.db_username, config.db_password) == (
        "h", 7000, "u", "p")


def test_tls_can_be_turned_off_for_a_plain_redis():
    assert not load_config({"DBHOST": "h", "DBTLS": "false"}).db_tls


def test_a_ca_file_is_used_when_it_exists(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert load_config({"DBHOST": "h", "DBCACERT": str(ca)}).db_ca_cert == str(ca)


@pytest.mark.parametrize("env", [
    {"PORT": "abc"}, {"PORT": "0"}, {"DBPORT": "x"}, {"DBTIMEOUT": "soon"},
    {"MAX_BODY_BYTES": "-5"}, {"LOG_LEVEL": "LOUD"}, {"WORKERS": "0"},
    {"REDIS_SERVER": "/nonexistent/redis-server"}, {"DBRETRYSECONDS": "-1"},
    {"DBRETRYSECONDS": "forever"}, {"DBWAITREPLICAS": "-1"}, {"DBWAITREPLICAS": "all"},
])
def test_invalid_values_raise_a_config_error(env):
    with pytest.raises(ConfigError):
        load_config(env)


def test_the_body_limit_defaults_to_one_mebibyte():
    assert Config().max_body_bytes == 1024 * 1024


def test_retries_and_replica_waits_are_configurable_and_zero_turns_retries_off():
    config = load_config({"DBRETRYSECONDS": "0", "DBWAITREPLICAS": "1"})
    assert (config.db_retry_seconds, config.db_wait_replicas) == (0.0, 1)
    assert (Config().db_retry_seconds, Config().db_wait_replicas) == (4.0, 0)


def test_slow_client_deadlines_have_defaults_and_are_configurable():
    config = load_config({"IDLE_TIMEOUT": "65", "MIN_SEND_RATE": "0", "SEND_TIMEOUT": "30",
                          "MIN_BODY_RATE": "100", "BODY_TIMEOUT": "5"})
    assert (config.idle_timeout, config.min_send_rate, config.send_timeout,
            config.min_body_rate, config.body_timeout) == (65.0, 0, 30.0, 100, 5.0)
    assert (Config().idle_timeout, Config().min_send_rate, Config().body_timeout) == (20.0, 4096,
                                                                                      30.0)


@pytest.mark.parametrize("env", [{"IDLE_TIMEOUT": "0"}, {"SEND_TIMEOUT": "soon"},
                                 {"MIN_SEND_RATE": "-1"}, {"MIN_BODY_RATE": "fast"},
                                 {"BODY_TIMEOUT": "301"}])
def test_invalid_slow_client_deadlines_raise_a_config_error(env):
    with pytest.raises(ConfigError):
        load_config(env)
