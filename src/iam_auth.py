"""Authenticate to MemoryDB with an IAM identity: tokens signed here, re-authentication in time.

A token is a SigV4 query-presigned `GET http://<cluster>/?Action=connect&User=<user>` for the
service `memorydb`, valid TOKEN_SECONDS, with the `http://` removed; the client sends
`AUTH <user> <token>`. Signing is local (botocore, credentials from the standard AWS chain:
environment, shared files, container or instance profile), so no request waits on AWS: only
botocore's own refresh of temporary credentials, every few hours, calls out, and the
background thread below makes it the one that usually does. MemoryDB closes a connection
12 hours after its last AUTH, so every REAUTH_SECONDS each pool authenticates again: idle
connections at once, connections in use when they are given back (redis-py's
re_auth_callback), which is never inside MULTI/EXEC because the service releases a
connection only after its EXEC. (redis-py sends the token's "oid" claim as the user name;
pinned redis 8.1 is what tests/test_iam_auth.py checks.)
"""

import logging
import threading
import time

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError
from botocore.session import get_session
from redis import exceptions as rx
from redis.auth.token import SimpleToken
from redis.credentials import CredentialProvider

log = logging.getLogger(__name__)

SERVICE = "memorydb"
TOKEN_SECONDS = 900
# A new connection gets a token at most this old, so still valid 5 minutes when sent.
TOKEN_MAX_AGE_SECONDS = 600
# The background thread signs a new token this often, ahead of the connections needing one.
REFRESH_SECONDS = 300
# Connections authenticate again this often: well inside MemoryDB's 12 hours, and a round
# that fails (the database down) is tried again at the next refresh.
REAUTH_SECONDS = 3600


def sign_token(cluster: str, user: str, region: str, credentials) -> str:
    """Return a MemoryDB IAM token for user of cluster, signed now with credentials."""
    request = AWSRequest(method="GET", url=f"http://{cluster}/",
                         params={"Action": "connect", "User": user})
    SigV4QueryAuth(credentials, SERVICE, region, expires=TOKEN_SECONDS).add_auth(request)
    return request.url.removeprefix("http://")


class IamCredentials(CredentialProvider):
    """Give redis-py the user and a token no older than TOKEN_MAX_AGE_SECONDS."""

    def __init__(self, user: str, cluster: str, region: str, credentials=None):
        self.user = user
        self.cluster = cluster
        self.region = region
        self._credentials = credentials
        self._token = None
        self._signed_at = 0.0
        self._lock = threading.Lock()

    def refresh(self) -> str:
        """Sign a new token with the current AWS credentials, keep it, and return it."""
        with self._lock:
            try:
                if self._credentials is None:
                    self._credentials = get_session().get_credentials()
                if self._credentials is None:
                    raise rx.AuthenticationError(
                        "DBAUTH=iam: no AWS credentials found (environment, shared "
                        "credentials file, container or instance profile)")
                frozen = self._credentials.get_frozen_credentials()
            except BotoCoreError as error:
                raise rx.AuthenticationError(f"DBAUTH=iam: AWS credentials: {error}") from error
            signed_at = time.time()
            self._token = sign_token(self.cluster, self.user, self.region, frozen)
            self._signed_at = signed_at
            return self._token

    def token(self) -> str:
        """Return the kept token, or a new one when it is TOKEN_MAX_AGE_SECONDS old."""
        token, age = self._token, time.time() - self._signed_at
        if token is None or not 0 <= age < TOKEN_MAX_AGE_SECONDS:
            token = self.refresh()
        return token

    def get_credentials(self) -> tuple[str, str]:
        """Return the user and a token: what redis-py sends in AUTH on a new connection."""
        return self.user, self.token()


def reauthenticate(client, provider: IamCredentials) -> None:
    """Have every connection of every node authenticate again with a new token."""
    token = provider.refresh()
    now_ms = time.time() * 1000
    # redis-py's re-authentication sends AUTH <claim "oid"> <value>: the user and the token.
    signed = SimpleToken(token, now_ms + TOKEN_SECONDS * 1000, now_ms, {"oid": provider.user})
    for node in client.get_nodes():
        client.get_redis_connection(node).connection_pool.re_auth_callback(signed)


class KeepAuthenticated(threading.Thread):
    """Sign tokens ahead of need, and re-authenticate every connection before MemoryDB's limit."""

    def __init__(self, client, provider: IamCredentials, refresh_seconds: float = REFRESH_SECONDS,
                 reauth_seconds: float = REAUTH_SECONDS):
        super().__init__(name="memorydb-iam", daemon=True)
        self.client = client
        self.provider = provider
        self.refresh_seconds = refresh_seconds
        self.reauth_seconds = reauth_seconds
        self.rounds = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        """Refresh the token every refresh_seconds; re-authenticate every reauth_seconds."""
        last_round = time.monotonic()
        while not self.stopped.wait(self.refresh_seconds):
            try:
                if time.monotonic() - last_round < self.reauth_seconds:
                    self.provider.refresh()
                    continue
                reauthenticate(self.client, self.provider)
                last_round = time.monotonic()
                self.rounds += 1
                log.info("re-authenticated the database connections with a new IAM token")
            except (rx.RedisError, OSError) as error:
                log.warning("IAM token refresh or re-authentication failed; trying again in "
                            "%ss: %s: %s", self.refresh_seconds, type(error).__name__, error)

    def stop(self) -> None:
        """Stop the thread after its current round."""
        self.stopped.set()


def provider_for(config) -> IamCredentials:
    """Return the credential provider for the configured cluster, user and region."""
    # Resolved now, while the environment still holds them (serving scrubs AWS secrets).
    credentials = get_session().get_credentials()
    return IamCredentials(config.db_username, config.db_cluster, config.aws_region, credentials)
