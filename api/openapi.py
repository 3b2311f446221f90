"""The OpenAPI document as the API really answers: AIQ's error body everywhere, one tag per operation.

FastAPI declares its own `HTTPValidationError` for 422 and nothing for the errors the edge and the
dependencies send. `custom_openapi()` rewrites the generated document once:
- every 422 uses `ErrorBody`, and FastAPI's `HTTPValidationError`/`ValidationError` schemas are dropped;
- errors that follow from an operation's shape are declared where the route did not: 401 and 403 (it needs a
  token; an API key may lack the scope or not be accepted there),
  413/415/422 (it takes a body), 422 (it takes parameters), 503 (it reaches the database);
- an operation is listed under one tag (its own route's), so Swagger UI shows it once;
- an operation without an explicit summary gets the first line of its docstring.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from api.errors import error_responses

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _error_entry(status: int) -> dict[str, Any]:
    description = error_responses(status)[status]["description"]
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _implied_errors(path: str, operation: dict[str, Any]) -> set[int]:
    statuses: set[int] = set()
    if operation.get("security"):
        # 403: an API key lacking the route's scope, or an API key where an access token is needed.
        statuses.update({401, 403})
    if "requestBody" in operation:
        statuses.update({413, 415, 422})
    if operation.get("parameters"):
        statuses.add(422)
    if path.startswith("/api/"):
        statuses.add(503)
    return statuses


def rewrite(schema: dict[str, Any]) -> dict[str, Any]:
    """Apply the rules above to a generated document (in place; returned for convenience)."""
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            for status in _implied_errors(path, operation):
                responses.setdefault(str(status), _error_entry(status))
            if "422" in responses:
                responses["422"] = {**responses["422"], "content": {"application/json": {"schema": _ERROR_REF}}}
            tags = operation.get("tags")
            if isinstance(tags, list) and len(tags) > 1:
                operation["tags"] = [tags[-1]]
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema


def _docstring_summaries(app: FastAPI) -> None:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.summary is None and route.description:
            route.summary = route.description.strip().splitlines()[0].strip().rstrip(".")


def install_openapi(app: FastAPI) -> None:
    """Serve the rewritten document at `/openapi.json` (built once, on first request)."""

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _docstring_summaries(app)
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            app.openapi_schema = rewrite(schema)
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
