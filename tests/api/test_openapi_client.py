"""The OpenAPI document matches the wire: a client generated from it parses the API's real error answers."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "aiq_generated_client"


@pytest.fixture(scope="module")
def generated(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("openapi-client")
    (root / "openapi.json").write_text(httpx.get(f"{stack.api_url}/openapi.json").text)
    result = subprocess.run(
        [str(GENERATOR), "generate", "--path", "openapi.json", "--meta", "none", "--output-path", PACKAGE],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        # The generator formats its output with ruff, which lives next to it.
        env={**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _mod(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_the_document_declares_aiq_errors_only(stack: Stack) -> None:
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas
    assert "ErrorBody" in schemas
    seen: list[str] = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            seen.append(f"{method.upper()} {path}")
            assert op.get("summary"), (path, method)
            assert op["summary"][0].isupper(), (path, method, op["summary"])
            assert len(op.get("tags", [])) <= 1, (path, method)
            for status, response in op["responses"].items():
                # /readyz' 503 is its own status body ({"status": "unavailable", "checks": ...}), declared so;
                # the login's 400 is RFC 6749's error body, which only the OAuth2 form gets.
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if (path, status) == ("/api/v1/auth/login", "400"):
                    assert set(schema["properties"]) == {"error", "error_description"}
                elif int(status) >= 400 and path != "/readyz":
                    assert schema.get("$ref") == "#/components/schemas/ErrorBody", (path, method, status)
            if path.startswith("/api/"):
                assert "503" in op["responses"], (path, method)
            if op.get("security"):
                # 403: an API key without the route's scope (`insufficient_scope`), or an API key where only
                # an access token will do (`access_token_required`): every authenticated route can send it.
                assert {"401", "403"} <= set(op["responses"]), (path, method)
            if "requestBody" in op:
                assert {"413", "415", "422"} <= set(op["responses"]), (path, method)
    assert seen.count("GET /api/v1/users/me") == 1
    # An operation without an explicit summary takes its docstring's first line, not FastAPI's name-made one.
    assert spec["paths"]["/api/v1/auth/register"]["post"]["summary"] == "Create an account"
    assert spec["paths"]["/api/v1/keys"]["get"]["summary"].startswith("Your live API keys")
    # The documented example of a submit is accepted as it stands (Swagger's "Try it out" sends it).
    example = schemas["QueryCreate"]["examples"][0]
    assert "model" not in example or example["model"] != "string"


def test_a_generated_client_parses_real_errors(generated: ModuleType, stack: Stack, user: dict[str, Any]) -> None:
    client_mod = _mod("client")
    models = _mod("models")
    submit = _mod("api.queries.submit_api_v1_query_post")
    get = _mod("api.queries.get_api_v1_query_query_id_get")
    cancel = _mod("api.queries.cancel_api_v1_query_query_id_cancel_post")
    token = user["tokens"]["access_token"]
    authed = client_mod.AuthenticatedClient(base_url=stack.api_url, token=token)
    anonymous = client_mod.AuthenticatedClient(base_url=stack.api_url, token="not-a-token")

    def error_of(response: Any) -> Any:
        assert isinstance(response.parsed, models.ErrorBody), (response.status_code, response.content)
        assert json.loads(response.content)["error"]["code"] == response.parsed.error.code
        return response.parsed.error

    r = submit.sync_detailed(client=authed, body=models.QueryCreate(query="hi", model="not-a-model"))
    assert r.status_code == 422
    error = error_of(r)
    assert error.code == "model_not_allowed"
    assert error.details[0].loc == ["body", "model"]

    r = submit.sync_detailed(client=authed, body=models.QueryCreate(query="x" * (300 * 1024)))
    assert r.status_code == 413
    assert error_of(r).code == "payload_too_large"

    r = submit.sync_detailed(client=anonymous, body=models.QueryCreate(query="hi"))
    assert r.status_code == 401
    assert error_of(r).code

    r = get.sync_detailed(query_id=uuid.uuid4(), client=authed)
    assert r.status_code == 404
    assert error_of(r).code == "query_not_found"

    accepted = submit.sync_detailed(client=authed, body=models.QueryCreate(query=f"parse me {uuid.uuid4()}"))
    assert accepted.status_code == 202
    assert isinstance(accepted.parsed, models.QueryAccepted)
    done = get.sync_detailed(query_id=accepted.parsed.query_id, client=authed, wait=20)
    assert done.status_code == 200
    assert isinstance(done.parsed, models.QueryOut)
    r = cancel.sync_detailed(query_id=accepted.parsed.query_id, client=authed)
    assert r.status_code == 409
    assert error_of(r).code == "query_not_cancellable"
