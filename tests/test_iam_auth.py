"""IAM authentication to MemoryDB: tokens signed locally, renewed for new connections, re-AUTH."""

import hashlib
import hmac
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, quote

import pytest
import time_machine
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from redis import exceptions as rx

from conftest import cluster_config
from database import connect, primary_of
from http_client import call
from iam_auth import (
    TOKEN_MAX_AGE_SECONDS,
    IamCredentials,
    KeepAuthenticated,
    reauthenticate,
    sign_token,
)
from local_cluster import APP_ACCESS
from server import create_app
from service_process import ServiceProcess
from settings import ConfigError, load_config

CREDENTIALS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                          "IQoJb3JpZ2luX2VjEXAMPLE/session+token==")
CLUSTER, REGION, USER = "customers-cluster", "eu-west-1", "iam-app"
START = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)


def botocore_token(at: datetime, credentials=CREDENTIALS) -> str:
    """Return what botocore's SigV4 query signer makes of the connect request at that time."""
    request = AWSRequest(method="GET", url=f"http://{CLUSTER}/",
                         params={"Action": "connect", "User": USER})
    with time_machine.travel(at, tick=False):
        SigV4QueryAuth(credentials, "memorydb", REGION, expires=900).add_auth(request)
    return request.url.removeprefix("http://")


def sigv4_signature(secret: str, timestamp: str, canonical_request: str) -> str:
    """Sign a canonical request for memorydb in REGION, as the SigV4 specification says."""
    scope = f"{timestamp[:8]}/{REGION}/memorydb/aws4_request"
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", timestamp, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (timestamp[:8], REGION, "memorydb", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def test_the_token_is_botocores_sigv4_query_signature_of_the_connect_request():
    with time_machine.travel(START, tick=False):
        token = sign_token(CLUSTER, USER, REGION, CREDENTIALS)
    assert token == botocore_token(START)
    assert token.startswith(f"{CLUSTER}/?Action=connect&User={USER}&X-Amz-Algorithm=")
    assert token != botocore_token(START + timedelta(seconds=1))


@pytest.mark.parametrize(("secret", "verifies"), [(CREDENTIALS.secret_key, True),
                                                  ("another-secret", False)])
def test_the_tokens_signature_verifies_by_the_sigv4_specification(secret, verifies):
    with time_machine.travel(START, tick=False):
        token = sign_token(CLUSTER, USER, REGION, CREDENTIALS)
    host, _, query = token.partition("/?")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    assert pairs[-1][0] == "X-Amz-Signature"
    signed = dict(pairs[:-1])
    assert host == CLUSTER
    assert signed == {
        "Action": "connect", "User": USER, "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{CREDENTIALS.access_key}/20261129/{REGION}/memorydb/aws4_request",
        "X-Amz-Date": "20261129T120000Z", "X-Amz-Expires": "900", "X-Amz-SignedHeaders": "host",
        "X-Amz-Security-Token": CREDENTIALS.token,
    }
    canonical_query = "&".join(f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
                               for name, value in sorted(signed.items()))
    canonical_request = "\n".join(["GET", "/", canonical_query, f"host:{CLUSTER}", "", "host",
                                   hashlib.sha256(b"").hexdigest()])
    expected = sigv4_signature(secret, "20261129T120000Z", canonical_request)
    assert hmac.compare_digest(expected, pairs[-1][1]) is verifies


def test_new_connections_get_a_token_no_older_than_ten_minutes():
    provider = IamCredentials(USER, CLUSTER, REGION, CREDENTIALS)
    with time_machine.travel(START, tick=False) as clock:
        assert provider.get_credentials() == (USER, botocore_token(START))
        clock.shift(TOKEN_MAX_AGE_SECONDS - 1)
        assert provider.get_credentials() == (USER, botocore_token(START))
        clock.shift(1)
        later = START + timedelta(seconds=TOKEN_MAX_AGE_SECONDS)
        assert provider.get_credentials() == (USER, botocore_token(later))


def test_missing_aws_credentials_are_a_clear_authentication_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no call beyond loopback
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    with pytest.raises(rx.AuthenticationError, match="no AWS credentials found"):
        IamCredentials(USER, CLUSTER, REGION).get_credentials()


def allow_only(cluster, *tokens) -> None:
    """Make tokens the IAM user's only passwords on every node, with the app's access string."""
    for node in cluster.nodes:
        cluster.admin(node).execute_command(
            "ACL", "SETUSER", USER, "reset", "on", *(f">{token}" for token in tokens),
            *APP_ACCESS.split())


def iam_connections(cluster) -> list[dict]:
    """Return CLIENT LIST's fields of every connection of the IAM user, on every node."""
    connections = []
    for node in cluster.nodes:
        listed = cluster.admin(node).client_list()
        connections += [{**fields, "port": node.port} for fields in listed
                        if fields["user"] == USER]
    return connections


@pytest.fixture
def iam_config(memorydb_cluster):
    """The service's config for the IAM user (its password is whatever the test allows)."""
    for node in memorydb_cluster.nodes:
        memorydb_cluster.admin(node).execute_command("ACL LOG RESET")
    yield cluster_config(memorydb_cluster, db_username=None, db_password=None, db_auth="iam",
                         db_cluster=CLUSTER, aws_region=REGION)
    for node in memorydb_cluster.nodes:
        memorydb_cluster.admin(node).execute_command("ACL", "DELUSER", USER)


@pytest.mark.cluster
def test_the_service_authenticates_with_new_tokens_as_the_clock_passes_the_refresh_point(
        memorydb_cluster, iam_config, open_database):
    provider = IamCredentials(USER, CLUSTER, REGION, CREDENTIALS)
    later = START + timedelta(seconds=TOKEN_MAX_AGE_SECONDS + 1)
    with time_machine.travel(START, tick=False) as clock:
        allow_only(memorydb_cluster, botocore_token(START))
        redis = open_database(iam_config, credential_provider=provider)
        service = create_app(iam_config, redis).test_client()
        created = service.post("/customers", json={"name": "Ann"})
        assert created.status_code == 201
        path = "/customers/" + created.json["id"]
        assert service.get(path).json == created.json

        # Past the refresh point, only the new token opens the door.
        clock.shift(TOKEN_MAX_AGE_SECONDS + 1)
        allow_only(memorydb_cluster, botocore_token(later))
        # By hand: the newcomer's connections must be closed before they are counted below.
        newcomer = connect(iam_config, credential_provider=provider)
        try:
            assert create_app(iam_config, newcomer).test_client().get(path).json == created.json
        finally:
            newcomer.close()
        # Connections opened with the old token still serve until they authenticate again.
        assert service.put(path, json={"vip": True}).status_code == 204

        # A connection inside MULTI when the round runs authenticates after its EXEC.
        key = "customer:" + created.json["id"]
        busy_pool = primary_of(redis, key).connection_pool
        idle, busy = busy_pool.get_connection(), busy_pool.get_connection()
        busy_pool.release(idle)
        busy.send_command("MULTI")
        assert busy.read_response() == "OK"
        busy.send_command("HSET", key, "tier", "gold")
        assert busy.read_response() == "QUEUED"
        reauthenticate(redis, provider)
        busy.send_command("EXEC")
        assert busy.read_response() == [1]  # the HSET alone: no AUTH was queued in the MULTI
        last = sorted(connection["cmd"] for connection in iam_connections(memorydb_cluster))
        assert len(last) >= 2 and last == ["auth"] * (len(last) - 1) + ["exec"]
        busy_pool.release(busy)
        connections = iam_connections(memorydb_cluster)
        assert connections and {connection["cmd"] for connection in connections} == {"auth"}

        assert service.get(path).json == {**created.json, "vip": True, "tier": "gold"}
    denied = [entry for node in memorydb_cluster.nodes
              for entry in memorydb_cluster.admin(node).execute_command("ACL LOG")]
    assert denied == []


@pytest.mark.cluster
def test_the_background_thread_reauthenticates_every_connection(memorydb_cluster, iam_config,
                                                                open_database):
    provider = IamCredentials(USER, CLUSTER, REGION, CREDENTIALS)
    with time_machine.travel(START, tick=False) as clock:
        allow_only(memorydb_cluster, botocore_token(START))
        redis = open_database(iam_config, credential_provider=provider)
        service = create_app(iam_config, redis).test_client()
        assert service.get("/customers?limit=10").status_code == 200
        clock.shift(60)
        allow_only(memorydb_cluster, botocore_token(START + timedelta(seconds=60)))
        keeper = KeepAuthenticated(redis, provider, refresh_seconds=0.05, reauth_seconds=0.1)
        keeper.start()
        try:
            deadline = time.monotonic() + 10
            while keeper.rounds == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            keeper.stop()
            keeper.join(5)
        assert keeper.rounds >= 1
        assert {connection["cmd"] for connection in iam_connections(memorydb_cluster)} == {"auth"}
        assert service.get("/customers?limit=10").status_code == 200


@pytest.mark.cluster
def test_the_service_process_connects_and_serves_with_dbauth_iam(memorydb_cluster, iam_config,
                                                                 tmp_path):
    # The service signs with the real clock: allow the tokens of each second of its start.
    now = datetime.now(timezone.utc).replace(microsecond=0)
    allow_only(memorydb_cluster, *(botocore_token(now + timedelta(seconds=second))
                                   for second in range(-2, 60)))
    env = {**memorydb_cluster.service_env(), "DBPASSWORD": "", "DBAUTH": "iam",
           "DBUSERNAME": USER, "DBCLUSTER": CLUSTER, "AWS_REGION": REGION,
           "AWS_ACCESS_KEY_ID": CREDENTIALS.access_key,
           "AWS_SECRET_ACCESS_KEY": CREDENTIALS.secret_key,
           "AWS_SESSION_TOKEN": CREDENTIALS.token, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
           "WORKERS": "1", "DBTIMEOUT": "1", "DBRETRYSECONDS": "1"}
    with ServiceProcess(env) as service:
        assert call(service.url + "/readyz")[::2] == (200, {"status": "ready"})
        status, _, created = call(service.url + "/customers", "POST", {"name": "Ann"})
        assert status == 201
        assert call(service.url + "/customers/" + created["id"])[2] == created
        assert iam_connections(memorydb_cluster)  # the service connected as the IAM user
    assert service.process.returncode == 0
    assert "Traceback" not in service.printed
    assert CREDENTIALS.secret_key not in service.printed


@pytest.mark.parametrize(("env", "words"), [
    ({"DBAUTH": "kerberos"}, "DBAUTH must be password or iam"),
    ({"DBAUTH": "iam", "DBUSERNAME": "u", "DBCLUSTER": "c"}, "needs AWS_REGION"),
    ({"DBAUTH": "iam", "DBCLUSTER": "c", "AWS_REGION": "r"}, "needs DBUSERNAME"),
    ({"DBAUTH": "iam", "DBUSERNAME": "u", "AWS_REGION": "r"}, "needs DBCLUSTER"),
    ({"DBAUTH": "iam", "DBUSERNAME": "u", "DBCLUSTER": "c", "AWS_REGION": "r",
      "DBPASSWORD": "p"}, "leave DBPASSWORD empty"),
    ({"DBAUTH": "iam", "DBUSERNAME": "u", "DBCLUSTER": "c", "AWS_REGION": "r",
      "DBTLS": "false"}, "needs DBTLS on"),
])
def test_an_incomplete_iam_setting_is_a_configuration_error(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config({"DBHOST": "clustercfg.example", **env})


def test_iam_settings_take_the_region_from_aws_default_region_too():
    config = load_config({"DBHOST": "h", "DBAUTH": "iam", "DBUSERNAME": "u", "DBCLUSTER": "c",
                          "AWS_DEFAULT_REGION": "us-east-1"})
    assert (config.db_auth, config.db_cluster, config.aws_region, config.db_tls) == (
        "iam", "c", "us-east-1", True)
    assert load_config({}).db_auth == "password"
