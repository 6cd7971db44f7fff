"""The served OpenAPI document generates a client (openapi-python-client) that works end to end."""

import importlib
import io
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from service_process import ServiceProcess
from test_listing import add_customers

pytestmark = pytest.mark.cluster
GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "customers_service_client"


def generate(served: bytes, directory: Path):
    """Generate a client package from a served document and import it."""
    document = directory / "openapi.json"
    document.write_bytes(served)
    # NDJSON imports are sent as the text of their lines (a str body of the generated client).
    (directory / "config.yaml").write_text("post_hooks: []\ncontent_type_overrides:\n"
                                           "  application/x-ndjson: application/octet-stream\n")
    run = subprocess.run([GENERATOR, "generate", "--path", document, "--meta", "none",
                          "--config", directory / "config.yaml"],
                         cwd=directory, capture_output=True, text=True, timeout=120)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    assert "Warning" not in printed and "Error" not in printed, printed
    sys.path.insert(0, str(directory))
    try:
        for name in [name for name in sys.modules if name.startswith(PACKAGE)]:
            del sys.modules[name]
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(directory))


def next_cursor(response) -> str | None:
    """Return the cursor of the Link header's next page, if any."""
    link = response.headers.get("link")
    if not link:
        return None
    return parse_qs(urlparse(link[1:link.index(">")]).query)["cursor"][0]


@pytest.mark.parametrize("token", [None, "generated-client-token-0123"])
def test_a_generated_client_creates_reads_updates_patches_pages_and_deletes(
        redis_cluster, cluster_database, tmp_path, token):
    env = {**redis_cluster.service_env(), "WORKERS": "1", "THREADS": "4"}
    if token:
        env["API_TOKENS"] = token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with ServiceProcess(env) as service:
        request = urllib.request.Request(f"{service.url}/openapi.json", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as served:
            generated = generate(served.read(), tmp_path)
        models = importlib.import_module(f"{PACKAGE}.models")
        client = (generated.AuthenticatedClient(base_url=service.url, token=token) if token
                  else generated.Client(base_url=service.url))
        try:
            use(client, models, cluster_database)
        finally:
            client.get_httpx_client().close()


def use(client, models, database):
    """Create, read, update, patch, page through and delete customers with the client."""
    types = importlib.import_module(f"{PACKAGE}.types")
    from_api = {name: importlib.import_module(f"{PACKAGE}.api.default.{name}")
                for name in ("create_customer", "get_customer", "put_customer",
                             "patch_customer", "list_customers", "delete_customer")}
    new = models.NewCustomer.from_dict({"name": "Joe", "balance": 10})
    created = from_api["create_customer"].sync_detailed(client=client, body=new)
    assert created.status_code == 201
    customer_id = created.parsed.id
    assert created.parsed.additional_properties == {"name": "Joe", "balance": 10}

    keyed = [from_api["create_customer"].sync_detailed(client=client, body=new,
                                                        idempotency_key="generated-1")
             for _ in range(2)]
    assert [answer.status_code for answer in keyed] == [201, 201]
    assert keyed[1].headers["idempotent-replayed"] == "true"
    assert keyed[1].parsed.id == keyed[0].parsed.id
    reused = from_api["create_customer"].sync_detailed(
        client=client, body=models.NewCustomer.from_dict({"name": "Ann"}),
        idempotency_key="generated-1")
    assert reused.status_code == 422 and "another body" in reused.parsed.message
    from_api["delete_customer"].sync_detailed(keyed[0].parsed.id, client=client)

    read = from_api["get_customer"].sync(customer_id, client=client)
    assert read.to_dict() == {"id": customer_id, "name": "Joe", "balance": 10}

    fields = models.CustomerFields.from_dict({"balance": 20, "vip": True})
    updated = from_api["put_customer"].sync_detailed(customer_id, client=client, body=fields)
    assert updated.status_code == 204
    put_new = from_api["put_customer"].sync_detailed("a b@x", client=client, body=fields)
    assert put_new.status_code == 201
    assert put_new.headers["location"] == "/customers/a%20b%40x"

    patch = models.MergePatch.from_dict({"vip": None, "city": "Oslo"})
    patched = from_api["patch_customer"].sync(customer_id, client=client, body=patch)
    assert patched.to_dict() == {"id": customer_id, "name": "Joe", "balance": 20,
                                 "city": "Oslo"}

    stored = add_customers(database, 250) | {customer_id, "a b@x"}
    listed, cursor, pages = [], None, 0
    while True:
        page = from_api["list_customers"].sync_detailed(
            client=client, limit=100, **({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200
        listed += [customer.id for customer in page.parsed]
        pages += 1
        cursor = next_cursor(page)
        if cursor is None:
            break
    assert sorted(listed) == sorted(stored)
    assert pages == 3

    projected = from_api["get_customer"].sync_detailed(customer_id, client=client,
                                                       fields="balance,city")
    assert projected.parsed.to_dict() == {"id": customer_id, "balance": 20, "city": "Oslo"}
    assert "etag" not in projected.headers
    lines = io.BytesIO(b'{"id": "imported", "n": 1}\n{"name": "Ann"}\nnot json\n')
    imported = from_api["create_customer"].sync_detailed(
        client=client, body=types.File(payload=lines))
    assert imported.status_code == 200
    assert isinstance(imported.parsed, models.ImportSummary)
    assert imported.parsed.to_dict() == {
        "lines": 3, "created": 2, "updated": 0, "failed": 1,
        "failures": [{"line": 3, "message": "the line is not valid JSON"}],
        "unlisted_failures": 0}

    deleted = from_api["delete_customer"].sync_detailed(customer_id, client=client)
    assert deleted.status_code == 204
    missing = from_api["get_customer"].sync_detailed(customer_id, client=client)
    assert missing.status_code == 404
    assert missing.parsed.message == f"customer {customer_id} does not exist"
