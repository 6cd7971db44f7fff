"""Health checks: /healthz never asks the database, /readyz tells whether it can serve."""

from embedded import free_port
from errors import RETRY_AFTER_SECONDS
from server import create_app
from settings import Config


def test_healthz_answers_200_without_asking_the_database_and_readyz_says_what_is_wrong(
        open_database):
    config = Config(db_host="127.0.0.1", db_port=free_port(), db_tls=False, db_timeout=0.5,
                    db_retry_seconds=0)
    client = create_app(config, open_database(config)).test_client()
    response = client.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["message"].startswith("not ready: database unreachable: ")
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)


def test_readyz_answers_200_when_the_database_can_serve(client):
    response = client.get("/readyz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ready"})
