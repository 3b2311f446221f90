"""The OpenAPI document matches the wire: a client generated from it parses the API's real error answers, the
native API's and the OpenAI-compatible `/v1` door's."""

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
from fastapi.routing import APIRoute

from api.compat import COMPAT_TAG
from api.compat import router as compat
from tests.support.stack import Stack

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "aiq_generated_client"
ERROR_BODY = "#/components/schemas/ErrorBody"
OPENAI_ERROR_BODY = "#/components/schemas/OpenAIErrorBody"


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


def test_the_document_declares_each_doors_own_errors(stack: Stack) -> None:
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas
    assert "ErrorBody" in schemas
    assert "OpenAIErrorBody" in schemas
    seen: list[str] = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            seen.append(f"{method.upper()} {path}")
            assert op.get("summary"), (path, method)
            assert op["summary"][0].isupper(), (path, method, op["summary"])
            assert len(op.get("tags", [])) <= 1, (path, method)
            compat = path.startswith("/v1/")
            for status, response in op["responses"].items():
                # /readyz' 503 is its own status body ({"status": "unavailable", "checks": ...}), declared so;
                # the login's 400 is RFC 6749's error body, which only the OAuth2 form gets.
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if (path, status) == ("/api/v1/auth/login", "400"):
                    assert set(schema["properties"]) == {"error", "error_description"}
                elif int(status) >= 400 and path != "/readyz":
                    expected = OPENAI_ERROR_BODY if compat else ERROR_BODY
                    assert schema.get("$ref") == expected, (path, method, status)
            if path.startswith("/api/"):
                assert "503" in op["responses"], (path, method)
            if op.get("security"):
                # The login's OAuth2 flow, or a bearer credential pasted as it is (an API key).
                assert op["security"] == [{"OAuth2PasswordBearer": []}, {"APIKeyBearer": []}], (path, method)
                # 403: an API key without the route's scope (`insufficient_scope`), or an API key where only
                # an access token will do (`access_token_required`): every authenticated route can send it.
                assert {"401", "403"} <= set(op["responses"]), (path, method)
            if "requestBody" in op:
                # The /v1 door answers a validation error with OpenAI's 400, never a 422.
                invalid = "400" if compat else "422"
                assert {"413", "415", invalid} <= set(op["responses"]), (path, method)
            if compat:
                assert "422" not in op["responses"], (path, method)
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

    r = submit.sync_detailed(client=authed, body=models.QueryCreate(query="x" * (stack.settings.max_body_bytes + 1)))
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


def test_a_generated_client_parses_real_openai_compatible_errors(
    generated: ModuleType, stack: Stack, user: dict[str, Any]
) -> None:
    client_mod = _mod("client")
    models = _mod("models")
    tag = "open_ai_compatible"
    get_model = _mod(f"api.{tag}.get_model_v1_models_model_id_get")
    list_models = _mod(f"api.{tag}.list_models_v1_models_get")
    chat = _mod(f"api.{tag}.create_chat_completion_v1_chat_completions_post")
    authed = client_mod.AuthenticatedClient(base_url=stack.api_url, token=user["tokens"]["access_token"])
    anonymous = client_mod.AuthenticatedClient(base_url=stack.api_url, token="not-a-token")

    def error_of(response: Any) -> Any:
        assert isinstance(response.parsed, models.OpenAIErrorBody), (response.status_code, response.content)
        assert json.loads(response.content)["error"]["code"] == response.parsed.error.code
        return response.parsed.error

    r = list_models.sync_detailed(client=authed)
    assert r.status_code == 200
    assert [m["id"] for m in json.loads(r.content)["data"]] == stack.settings.allowed_models
    # The success bodies are declared too: the generated client parses them into its models.
    assert isinstance(r.parsed, models.ModelList)
    assert [m.id for m in r.parsed.data] == stack.settings.allowed_models

    r = list_models.sync_detailed(client=anonymous)
    assert r.status_code == 401
    assert error_of(r).code == "invalid_api_key"

    r = get_model.sync_detailed(model_id="no-such-model", client=authed)
    assert r.status_code == 404
    error = error_of(r)
    assert (error.type_, error.code) == ("invalid_request_error", "model_not_found")

    # A validation error is OpenAI's 400 naming the field, in the declared shape.
    bad = models.ChatCompletionCreate(model="sim-small", messages=[])
    r = chat.sync_detailed(client=authed, body=bad)
    assert r.status_code == 400
    error = error_of(r)
    assert (error.type_, error.param) == ("invalid_request_error", "messages")


def test_the_openai_compatible_operations_are_in_the_document(stack: Stack) -> None:
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    documented = {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method, op in item.items()
    }
    # Every route of api/compat/, none left out.
    routes = {
        (method, route.path_format)
        for router in compat.routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert len(routes) == 16, routes
    assert set(documented) == routes
    tag = next(t for t in spec["tags"] if t["name"] == COMPAT_TAG)
    assert "`openai` SDK" in tag["description"]
    assert "base_url=<AIQ>/v1" in tag["description"]
    # Listed after the native API's tags, as the operations come.
    assert [t["name"] for t in spec["tags"]].index(COMPAT_TAG) > [t["name"] for t in spec["tags"]].index("queries")
    for (method, path), op in documented.items():
        assert op["tags"] == [COMPAT_TAG], (method, path)
        assert op["security"] == [{"OAuth2PasswordBearer": []}, {"APIKeyBearer": []}], (method, path)
        assert {"401", "403", "503"} <= set(op["responses"]), (method, path)
        if "{" in path:
            assert "404" in op["responses"], (method, path)
    error = spec["components"]["schemas"]["OpenAIError"]
    assert set(error["required"]) == {"message", "type", "param", "code"}

    def body_ref(method: str, path: str) -> str:
        ref: str = documented[(method, path)]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return ref.rsplit("/", 1)[-1]

    assert body_ref("POST", "/v1/chat/completions") == "ChatCompletionCreate"
    assert body_ref("POST", "/v1/responses") == "ResponseCreate"
    assert body_ref("POST", "/v1/batches") == "BatchCreate"
    upload = documented[("POST", "/v1/files")]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["required"]) == {"file", "purpose"}
    # The submits answer the caller's limits with OpenAI's 429; a stream takes one of the caller's stream slots.
    for key in [("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}")]:
        assert "429" in documented[key]["responses"], key
        assert "text/event-stream" in documented[key]["responses"]["200"]["content"], key
    assert {"502", "504"} <= set(documented[("POST", "/v1/chat/completions")]["responses"])
    assert "application/jsonl" in documented[("GET", "/v1/files/{file_id}/content")]["responses"]["200"]["content"]
    # Every other operation declares its JSON success body by its model (tests/api/test_openapi_objects.py checks
    # real answers against them).
    for key, op in documented.items():
        if key != ("GET", "/v1/files/{file_id}/content"):
            assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].startswith(
                "#/components/schemas/"
            ), key
