"""The OpenAPI document is valid, describes every route, and is served at /openapi.json."""

import json
import re
import subprocess

import fakeredis
import pytest
from openapi_spec_validator import validate

from api_contract import DOCUMENT
from server import create_app
from settings import Config

REDOCLY = "@redocly/cli@2.77.0"
TOKEN = "contract-token-0123456789"

AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}


def document() -> dict:
    """The OpenAPI document kept in the repository."""
    return json.loads(DOCUMENT.read_text())


def registered_operations(app) -> set:
    """Return (OpenAPI path, lower-case method) for every route of the app."""
    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        operations |= {(path, method.lower()) for method in rule.methods - AUTOMATIC_METHODS}
    return operations


def documented_operations() -> set:
    """Return (path, method) for every operation of the document."""
    return {(path, method) for path, item in document()["paths"].items()
            for method in item if method != "parameters"}


def test_the_document_is_a_valid_openapi_3_1_document():
    spec = document()
    validate(spec)
    assert spec["openapi"].startswith("3.1.")


def test_every_route_of_the_app_is_in_the_document(app):
    operations = registered_operations(app)
    assert ("/customers/{customer_id}", "patch") in operations
    assert operations <= documented_operations()


def test_every_error_answer_in_the_document_has_the_one_error_shape():
    spec = document()
    for name, response in spec["components"]["responses"].items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, name
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    resolved = spec["components"]["responses"].get(
                        response.get("$ref", "").rsplit("/", 1)[-1], response)
                    assert resolved["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (path, method, status)


def served(tokens: tuple) -> dict:
    """Return the document as a service with these API tokens serves it."""
    app = create_app(Config(api_tokens=tokens), fakeredis.FakeRedis(decode_responses=True))
    headers = {"Authorization": f"Bearer {TOKEN}"} if tokens else {}
    response = app.test_client().get("/openapi.json", headers=headers)
    assert response.status_code == 200
    assert response.content_type == "application/json"
    return response.get_json()


def test_a_service_with_tokens_serves_the_document_with_bearer_security():
    assert served((TOKEN,)) == document()
    assert document()["security"] == [{"bearerToken": []}]


def test_a_service_without_tokens_serves_a_document_that_declares_no_security():
    spec = served(())
    validate(spec)
    text = json.dumps(spec)
    assert spec["security"] == [] and "bearerToken" not in text and '"401"' not in text
    assert spec["paths"].keys() == document()["paths"].keys()


@pytest.mark.parametrize("tokens", [(), (TOKEN,)])
def test_redocly_lint_finds_no_error_in_the_served_document(tmp_path, tokens):
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(served(tokens)))
    run = subprocess.run(["npx", "--yes", REDOCLY, "lint", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(run.stdout)
    errors = [problem for problem in report["problems"] if problem["severity"] == "error"]
    assert report["totals"]["errors"] == 0, errors


@pytest.mark.parametrize(("body", "words"), [
    ('{"a": 1e400}', "outside the range of a 64-bit float"),
    ('{"a": -1e309}', "outside the range of a 64-bit float"),
    ('{"a": ' + "9" * 5000 + "}", "outside the range of a 64-bit float"),
    ('{"a": ' + "9" * 310 + "}", "outside the range of a 64-bit float"),
    ('{"a": 1, "b": 2, "a": 3}', 'member "a" more than once'),
    ('{"id": "x", "a": 1, "id": "y"}', 'member "id" more than once'),
    ('{"a": "\\ud800"}', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
    ('{"a": null}', "no null values"),
])
def test_inputs_that_cannot_be_stored_as_sent_are_400(client, stored_keys, body, words):
    response = client.post("/customers", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert words in response.get_json()["message"]
    assert stored_keys() == []
