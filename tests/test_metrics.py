"""GET /metrics: Prometheus text the library's own parser reads, by URL rule, behind tokens."""

import os

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import exceptions as rx

import metrics
from database import Retrying
from server import create_app
from settings import Config, ConfigError, load_config

API_TOKEN = "api-token-0123456789"
SCRAPER_TOKEN = "scraper-token-0123456789"
CUSTOMER_ROUTE = "/customers/<path:customer_id>"


def samples(client, headers=None) -> dict:
    """Scrape the app and return {(sample name, sorted label pairs): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for sample in family.samples}


def requests_of(scraped: dict, method: str, route: str, status: int) -> float:
    """Return customers_requests_total for one method, route and status (0 when absent)."""
    labels = (("method", method), ("route", route), ("status", str(status)))
    return scraped.get(("customers_requests_total", labels), 0.0)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_requests_are_counted_by_url_rule_never_by_raw_path(client):
    before = samples(client)
    assert client.put("/customers/m1", json={"name": "Ada"}).status_code == 201
    assert client.get("/customers/m1").status_code == 200
    assert client.get("/customers/m2").status_code == 404
    after = samples(client)
    assert requests_of(after, "PUT", CUSTOMER_ROUTE, 201) - requests_of(
        before, "PUT", CUSTOMER_ROUTE, 201) == 1
    assert requests_of(after, "GET", CUSTOMER_ROUTE, 200) - requests_of(
        before, "GET", CUSTOMER_ROUTE, 200) == 1
    assert requests_of(after, "GET", CUSTOMER_ROUTE, 404) - requests_of(
        before, "GET", CUSTOMER_ROUTE, 404) == 1
    assert requests_of(after, "GET", "/metrics", 200) - requests_of(
        before, "GET", "/metrics", 200) == 1
    assert not [key for key in after if any("m1" in value or "m2" in value
                                            for _, value in key[1])]


def test_durations_fall_in_buckets_from_one_millisecond_to_ten_seconds(client):
    client.get("/customers/m3")
    scraped = samples(client)
    bounds = sorted(float(dict(labels)["le"]) for name, labels in scraped
                    if name == "customers_request_duration_seconds_bucket"
                    and dict(labels)["route"] == CUSTOMER_ROUTE and dict(labels)["method"] == "GET")
    assert bounds[0] == 0.001
    assert bounds[-2:] == [10.0, float("inf")]
    assert bounds[:-1] == sorted(metrics.BUCKETS)
    count = scraped[("customers_request_duration_seconds_count",
                     (("method", "GET"), ("route", CUSTOMER_ROUTE)))]
    assert scraped[("customers_request_duration_seconds_bucket",
                    (("le", "+Inf"), ("method", "GET"), ("route", CUSTOMER_ROUTE)))] == count


def test_unknown_paths_and_methods_are_counted_under_fixed_labels(client):
    before = samples(client)
    client.get("/no/such/path/x7")
    client.open("/customers", method="BREW")
    after = samples(client)
    assert requests_of(after, "GET", "unmatched", 404) - requests_of(
        before, "GET", "unmatched", 404) == 1
    assert requests_of(after, "other", "unmatched", 405) - requests_of(
        before, "other", "unmatched", 405) == 1
    assert not [key for key in after if any("x7" in value or "BREW" in value
                                            for _, value in key[1])]


def test_a_streamed_list_is_in_progress_until_its_body_is_closed(client):
    client.put("/customers/m4", json={"name": "Ada"})
    gauge = ("customers_streamed_lists_in_progress", ())
    before = samples(client)[gauge]
    response = client.get("/customers", buffered=False)
    assert samples(client)[gauge] == before + 1
    assert b"m4" in response.get_data()
    response.close()
    assert samples(client)[gauge] == before


def test_an_outage_counts_database_errors_by_kind_retries_and_the_503():
    server = fakeredis.FakeServer()
    app = create_app(Config(db_retry_seconds=0.2),
                     fakeredis.FakeRedis(server=server, decode_responses=True))
    client = app.test_client()
    before = samples(client)
    server.connected = False
    assert client.get("/customers/m5").status_code == 503
    server.connected = True
    after = samples(client)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("customers_unavailable_responses_total", (("route", CUSTOMER_ROUTE),)) == 1
    assert grew("customers_database_operations_retried_total") == 1
    # The first attempt and at least one retry failed.
    assert grew("customers_database_errors_total", (("kind", "ConnectionError"),)) >= 2
    assert requests_of(after, "GET", CUSTOMER_ROUTE, 503) - requests_of(
        before, "GET", CUSTOMER_ROUTE, 503) == 1


def test_a_call_that_succeeds_on_retry_counts_one_error_and_one_retried_operation(app):
    client = app.test_client()
    failures = [rx.TimeoutError("slow")]

    def flaky():
        if failures:
            raise failures.pop()
        return "done"

    before = samples(client)
    assert Retrying(None, 1.0)(flaky) == "done"
    after = samples(client)
    kind = ("customers_database_errors_total", (("kind", "TimeoutError"),))
    retried = ("customers_database_operations_retried_total", ())
    assert after[kind] - before.get(kind, 0) == 1
    assert after[retried] - before[retried] == 1


@pytest.fixture
def guarded(redis_client):
    """The app with API tokens and a scraper's token."""
    config = Config(api_tokens=(API_TOKEN,), metrics_tokens=(SCRAPER_TOKEN,))
    return create_app(config, redis_client).test_client()


def test_with_api_tokens_metrics_needs_one_and_health_stays_open(redis_client):
    client = create_app(Config(api_tokens=(API_TOKEN,)), redis_client).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("wrong-token-0123456789")).status_code == 401
    samples(client, bearer(API_TOKEN))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_the_metrics_token_opens_metrics_and_nothing_else(guarded):
    samples(guarded, bearer(SCRAPER_TOKEN))
    samples(guarded, bearer(API_TOKEN))
    assert guarded.get("/metrics").status_code == 401
    for path in ("/customers", "/customers/1", "/openapi.json", "/docs"):
        assert guarded.get(path, headers=bearer(SCRAPER_TOKEN)).status_code == 401, path


def test_a_metrics_token_alone_guards_metrics_and_leaves_the_api_open(redis_client):
    client = create_app(Config(metrics_tokens=(SCRAPER_TOKEN,)), redis_client).test_client()
    assert client.get("/metrics").status_code == 401
    samples(client, bearer(SCRAPER_TOKEN))
    assert client.get("/customers").status_code == 200


def test_metrics_can_be_turned_off(redis_client):
    client = create_app(Config(metrics=False), redis_client).test_client()
    assert client.get("/metrics").status_code == 404


def test_metrics_settings_are_read_and_checked():
    config = load_config({"METRICS": "false", "METRICS_TOKEN": f"{SCRAPER_TOKEN}, {API_TOKEN}"})
    assert not config.metrics
    assert config.metrics_tokens == (SCRAPER_TOKEN, API_TOKEN)
    assert SCRAPER_TOKEN not in repr(config)
    assert load_config({}).metrics
    with pytest.raises(ConfigError, match="METRICS_TOKEN: token 1 is shorter"):
        load_config({"METRICS_TOKEN": "short"})
    with pytest.raises(ConfigError, match="METRICS must be true or false"):
        load_config({"METRICS": "maybe"})


def test_a_start_removes_the_directories_of_killed_services_and_keeps_live_ones(tmp_path):
    orphan = tmp_path / f"{metrics.PREFIX}{2**31 + 7}-abc"  # above any pid Linux gives
    live = tmp_path / f"{metrics.PREFIX}{os.getpid()}-def"
    operators = tmp_path / "customers-metrics-kept"
    for directory in (orphan, live, operators):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    metrics.remove_orphans(tmp_path)
    assert not orphan.exists()
    assert live.exists() and operators.exists()
