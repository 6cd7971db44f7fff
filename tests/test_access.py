"""Optional bearer tokens: configured, every request but the health checks needs one."""

import logging

import pytest

from access import warn_if_open
from server import create_app
from settings import Config, ConfigError, load_config

TOKENS = ("first-token-0123456789", "second-token-0123456789")


@pytest.fixture
def guarded(redis_client):
    """A test client of the app with API tokens."""
    return create_app(Config(api_tokens=TOKENS), redis_client).test_client()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"},
    {"Authorization": "first-token-0123456789"},
])
def test_a_request_without_a_bearer_token_is_401_with_a_challenge(guarded, headers):
    for method, path in (("get", "/customers"), ("get", "/customers/1"), ("post", "/customers"),
                         ("delete", "/customers/1"), ("get", "/openapi.json"),
                         ("get", "/nowhere")):
        response = getattr(guarded, method)(path, headers=headers)
        assert response.status_code == 401
        assert response.get_json() == {"message": 'send "Authorization: Bearer <token>"'}
        assert response.headers["WWW-Authenticate"] == "Bearer realm=customers"


def test_a_wrong_token_is_401_invalid_token_and_stores_nothing(guarded, stored_keys):
    for token in ("first-token-012345678", "first-token-01234567890", TOKENS[0].upper(), "é"):
        response = guarded.put("/customers/1", json={"name": "x"}, headers=bearer(token))
        assert response.status_code == 401
        assert response.get_json() == {"message": "the bearer token is not valid"}
        assert response.headers["WWW-Authenticate"] == "Bearer realm=customers, error=invalid_token"
    assert stored_keys() == []


def test_every_configured_token_opens_every_route(guarded):
    for number, token in enumerate(TOKENS):
        assert guarded.put("/customers/1", json={"name": "Joe"},
                           headers=bearer(token)).status_code == (204 if number else 201)
        assert guarded.get("/customers/1", headers=bearer(token)).get_json() == {
            "id": "1", "name": "Joe"}
        assert guarded.get("/openapi.json", headers=bearer(token)).status_code == 200
    assert guarded.get("/nowhere", headers=bearer(TOKENS[0])).status_code == 404


def test_only_the_exact_health_paths_are_open(guarded):
    for path in ("/healthz", "/readyz"):
        assert guarded.get(path).status_code != 401
    for path in ("/healthz/", "/readyz/x", "/healthzz", "/HEALTHZ"):
        assert guarded.get(path).status_code == 401


def test_tokens_never_reach_the_log(guarded, caplog):
    caplog.set_level(logging.DEBUG)
    guarded.get("/customers", headers=bearer(TOKENS[1]))
    guarded.get("/customers", headers=bearer("wrong-token-0123456789"))
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert "/customers" in logged
    assert TOKENS[1] not in logged
    assert "wrong-token" not in logged


def test_tokens_come_from_api_tokens_and_the_tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# rotated monthly\nfile-token-0123456789\n\n  other-file-token-0123  \n")
    config = load_config({"API_TOKENS": f" {TOKENS[0]} ,{TOKENS[1]},",
                          "API_TOKENS_FILE": str(path)})
    assert config.api_tokens == (*TOKENS, "file-token-0123456789", "other-file-token-0123")
    assert not any(token in repr(config) for token in config.api_tokens)
    assert load_config({}).api_tokens == ()


@pytest.mark.parametrize(("env", "file_text", "words"), [
    ({"API_TOKENS_FILE": "missing"}, None, "API_TOKENS_FILE cannot be read"),
    ({}, "", "API_TOKENS_FILE holds no token"),
    ({}, "# only a comment\n\n", "API_TOKENS_FILE holds no token"),
    ({}, "short\n", "token 1 is shorter than 16"),
    ({"API_TOKENS": "good-token-0123456789,with space 0123456789"}, None, "token 2 has"),
    ({"API_TOKENS": "too-short"}, None, "API_TOKENS: token 1 is shorter"),
])
def test_unusable_tokens_are_a_clear_config_error_that_never_shows_them(tmp_path, env,
                                                                       file_text, words):
    if file_text is not None:
        (tmp_path / "tokens").write_text(file_text)
        env = {**env, "API_TOKENS_FILE": str(tmp_path / "tokens")}
    elif "API_TOKENS_FILE" in env:
        env = {**env, "API_TOKENS_FILE": str(tmp_path / env["API_TOKENS_FILE"])}
    with pytest.raises(ConfigError, match=words) as raised:
        load_config(env)
    assert "0123456789" not in str(raised.value)
    assert "short" not in str(raised.value).replace("shorter", "")


def test_a_tokens_file_that_is_not_text_is_a_config_error(tmp_path):
    (tmp_path / "tokens").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config({"API_TOKENS_FILE": str(tmp_path / "tokens")})


@pytest.mark.parametrize(("host", "tokens", "warns"), [
    ("0.0.0.0", (), True),
    ("10.1.2.3", (), True),
    ("::", (), True),
    ("0.0.0.0", TOKENS, False),
    ("127.0.0.1", (), False),
    ("127.0.0.2", (), False),
    ("localhost", (), False),
    ("::1", (), False),
])
def test_auth_none_beyond_loopback_warns_at_start(caplog, host, tokens, warns):
    caplog.set_level(logging.WARNING)
    warn_if_open(Config(host=host, api_tokens=tokens, auth="tokens" if tokens else "none"))
    assert ("AUTH=none: listening on" in caplog.text) == warns


def test_a_base64_token_with_padding_works(redis_client):
    token = "Zm9vYmFy/base64+token=="
    client = create_app(Config(api_tokens=load_config({"API_TOKENS": token}).api_tokens),
                        redis_client).test_client()
    assert client.get("/customers", headers=bearer(token)).status_code == 200
    assert client.get("/customers", headers=bearer(token[:-1])).status_code == 401


# A web page can point its own name at 127.0.0.1 (DNS rebinding): its script's requests then
# reach a service open on loopback, sent with that name as the Host.
FOREIGN_HOSTS = ["evil.example", "evil.example:8080", "localhost.evil.example",
                 "127.0.0.1.nip.io:8080", "[::1", ""]
LOCAL_HOSTS = ["localhost", "LOCALHOST:8080", "127.0.0.1:8080", "127.0.0.2", "[::1]:8080",
               "app.localhost:3000", "0.0.0.0:8080"]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_open_on_loopback_a_request_for_another_host_is_421_and_changes_nothing(
        redis_client, stored_keys, host):
    client = create_app(Config(), redis_client).test_client()
    client.put("/customers/1", json={"name": "Ada"})
    foreign = {"Host": host}
    for response in (client.get("/customers", headers=foreign),
                     client.get("/customers/1", headers=foreign),
                     client.put("/customers/1", json={"name": "Eve"}, headers=foreign),
                     client.post("/customers", json={"name": "Eve"}, headers=foreign),
                     client.delete("/customers/1", headers=foreign)):
        assert response.status_code == 421
        assert response.get_json()["message"].startswith(f"Host {host!r} is not a name of this "
                                                         "machine: without API tokens")
    assert stored_keys() == ["customer:1"]
    assert client.get("/customers/1").get_json() == {"id": "1", "name": "Ada"}
    # Health checks answer whatever the Host.
    assert client.get("/healthz", headers=foreign).status_code == 200


# A DNS label over 63 characters is a name werkzeug cannot bind: Flask-RESTful's error router
# once matched the URL again while answering, and the service answered a bare 500.
FORGED_HOSTS = ["a" * 5000 + ".example", "a" * 64, "caf\xe9.example", "localhost\x7f.example"]


def test_a_forged_host_of_any_size_or_bytes_is_421_naming_at_most_100_characters(redis_client):
    client = create_app(Config(), redis_client).test_client()
    for host in FORGED_HOSTS:
        response = client.get("/customers", headers={"Host": host})
        assert response.status_code == 421
        assert response.get_json()["message"].startswith(f"Host {host[:100]!r} is not a name")


def test_with_tokens_a_host_werkzeug_cannot_read_is_a_json_400(redis_client):
    client = create_app(Config(api_tokens=TOKENS), redis_client).test_client()
    for host in FORGED_HOSTS[:2]:
        response = client.get("/customers", headers={"Host": host, **bearer(TOKENS[0])})
        assert response.status_code == 400
        assert response.mimetype == "application/json"


@pytest.mark.parametrize("host", LOCAL_HOSTS)
def test_open_on_loopback_a_request_for_this_machine_is_served(redis_client, host):
    client = create_app(Config(), redis_client).test_client()
    response = client.put("/customers/1", json={"name": "Ada"}, headers={"Host": host})
    assert response.status_code == 201
    assert client.get("/customers/1", headers={"Host": host}).status_code == 200


def test_any_host_is_served_with_tokens_or_open_beyond_loopback(redis_client):
    with_tokens = create_app(Config(api_tokens=TOKENS), redis_client).test_client()
    assert with_tokens.get("/customers", headers={
        "Host": "api.example.com", **bearer(TOKENS[0])}).status_code == 200
    # Open on purpose (AUTH=none) beyond loopback: names are the network's.
    open_everywhere = create_app(Config(host="0.0.0.0"), redis_client).test_client()
    assert open_everywhere.get("/customers", headers={"Host": "api.internal"}).status_code == 200
