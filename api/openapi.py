"""The OpenAPI document as the API really answers: AIQ's error body (OpenAI's under `/v1`), one tag per operation.

FastAPI declares its own `HTTPValidationError` for 422 and nothing for the errors the edge and the
dependencies send. `custom_openapi()` rewrites the generated document once:
- every 422 uses `ErrorBody`, and FastAPI's `HTTPValidationError`/`ValidationError` schemas are dropped;
- errors that follow from an operation's shape are declared where the route did not: 401 and 403 (it needs a
  token; an API key may lack the scope or not be accepted there),
  400/413/415/422 (it takes a body: 400 for one that cannot be parsed at all), 422 (it takes parameters that can
  be invalid), 503 (it reaches the database);
- the OpenAI-compatible operations (`/v1/...`) answer errors as `api/compat/errors.py` renders them: their
  implied errors use `OpenAIErrorBody`, and a validation error is declared as the 400 it is there, not a 422;
- an operation is listed under one tag (its own route's), so Swagger UI shows it once; the tags are listed
  in the order their operations come, with the description the app gives them (`openapi_tags`);
- a success answer declared by its model (`responses={200: {"model": …}}`, the `/v1` objects, whose routes return
  plain dicts for speed) is that model alone, without the `dict` FastAPI infers from the route's return type;
- an operation without an explicit summary gets the first line of its docstring;
- a bearer credential can also be pasted as it is (`APIKeyBearer`, beside the OAuth2 password flow): Swagger UI's
  Authorize then takes an API key, which the password flow cannot give;
- the models responses name by hand (`component_ref`: the `/v1` error body, the streams' events) are added to the
  components. `sse_event_schema` is how a route declares one event of its `text/event-stream` answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.compat.errors import is_compat_path, openai_error_responses
from api.errors import error_responses
from shared.schemas_openai import OpenAIErrorBody

_REF_TEMPLATE = "#/components/schemas/{model}"
_ERROR_REF = {"$ref": _REF_TEMPLATE.format(model="ErrorBody")}
# Models a route's responses name by hand (`component_ref`), which FastAPI does not know to add to the components.
_BY_HAND: dict[str, type[BaseModel]] = {}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_LOGIN_SCHEME = "OAuth2PasswordBearer"
_BEARER_SCHEME = "APIKeyBearer"


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to `model`'s schema for a response declared by hand (a stream's events); the rewrite adds the
    model, and the models it uses, to the document's components."""
    _BY_HAND[model.__name__] = model
    return {"$ref": _REF_TEMPLATE.format(model=model.__name__)}


_OPENAI_ERROR_REF = component_ref(OpenAIErrorBody)


def sse_event_schema(
    data: str,
    event: dict[str, Any],
    *,
    with_id: bool = False,
    data_schema: dict[str, Any] | None = None,
    last_data: str | None = None,
) -> dict[str, Any]:
    """The OpenAPI schema of one Server-Sent Event of a `text/event-stream` answer, as a client parses it (the
    HTML standard's fields; OpenAPI 3.1 has no per-item schema for a stream, so tools such as schemathesis take the
    media type's `schema` for one event's): `data` a string (what it holds: `data`; the schema of its JSON:
    `data_schema`, as `contentSchema`; `last_data`: the non-JSON text of a closing event, such as `[DONE]`),
    `event` ("message" when the stream names none: `event`), `id` when `with_id`."""
    payload: dict[str, Any] = {"type": "string"}
    if data_schema is not None:
        payload = {**payload, "contentMediaType": "application/json", "contentSchema": data_schema}
    if last_data is not None:
        payload = {"anyOf": [payload, {"type": "string", "const": last_data}]}
    properties: dict[str, Any] = {
        "event": event,
        "data": {"description": data, **payload},
        "retry": {"type": "integer", "minimum": 0},
    }
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$", "description": "The event's sequence number"}
    return {"type": "object", "required": ["data", "event", *(["id"] if with_id else [])], "properties": properties}


def _error_entry(path: str, status: int) -> dict[str, Any]:
    compat = is_compat_path(path)
    declared = openai_error_responses(status) if compat else error_responses(status)
    schema = _OPENAI_ERROR_REF if compat else _ERROR_REF
    return {"description": declared[status]["description"], "content": {"application/json": {"schema": schema}}}


def _can_be_invalid(parameter: dict[str, Any]) -> bool:
    # Any string fits a plain string parameter (`/v1`'s ids: a malformed one is a 404 like a missing one).
    schema: dict[str, Any] = parameter.get("schema", {})
    return schema.get("type") != "string" or bool(set(schema) - {"type", "title", "description"})


def _implied_errors(path: str, operation: dict[str, Any]) -> set[int]:
    statuses: set[int] = set()
    compat = is_compat_path(path)
    # The `/v1` door answers a validation error with OpenAI's 400 (api/compat/errors.py).
    invalid = 400 if compat else 422
    if operation.get("security"):
        # 403: an API key lacking the route's scope, or an API key where an access token is needed.
        statuses.update({401, 403})
    if "requestBody" in operation:
        # 400: a body that cannot be read as JSON at all (not UTF-8, not text), before any validation.
        statuses.update({400, 413, 415, invalid})
    if any(_can_be_invalid(parameter) for parameter in operation.get("parameters", ())):
        statuses.add(invalid)
    if path.startswith("/api/") or compat:
        statuses.add(503)
    return statuses


def _ordered_tags(schema: dict[str, Any]) -> None:
    described = {tag["name"]: tag for tag in schema.get("tags", [])}
    if not described:
        return
    # Swagger UI shows the tags listed here first: list them all, in the order of their operations.
    operations = [op for item in schema.get("paths", {}).values() for op in item.values() if isinstance(op, dict)]
    names = [tag for op in operations for tag in op.get("tags", [])]
    ordered = list(dict.fromkeys([*names, *described]))
    schema["tags"] = [described.get(name, {"name": name}) for name in ordered]


def _declared_models_only(responses: dict[str, Any]) -> None:
    # A route returning `dict[str, Any]` that declares its answer's model (`responses={200: {"model": …}}`, the
    # `/v1` objects): FastAPI merges the inferred `{"type": "object", "additionalProperties": true, "title": …}`
    # into the model's `$ref`. The declared model is the answer's shape.
    for response in responses.values():
        for media in response.get("content", {}).values():
            schema = media.get("schema", {})
            if "$ref" in schema and len(schema) > 1:
                media["schema"] = {"$ref": schema["$ref"]}


def rewrite(schema: dict[str, Any]) -> dict[str, Any]:
    """Apply the rules above to a generated document (in place; returned for convenience)."""
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if is_compat_path(path):
                # FastAPI's own 422 for a body or parameters: the 400 implied below.
                responses.pop("422", None)
            for status in _implied_errors(path, operation):
                responses.setdefault(str(status), _error_entry(path, status))
            if "422" in responses:
                responses["422"] = {**responses["422"], "content": {"application/json": {"schema": _ERROR_REF}}}
            _declared_models_only(responses)
            tags = operation.get("tags")
            if isinstance(tags, list) and len(tags) > 1:
                operation["tags"] = [tags[-1]]
            if operation.get("security") == [{_LOGIN_SCHEME: []}]:
                # Either one: the same `Authorization: Bearer` header.
                operation["security"] = [{_LOGIN_SCHEME: []}, {_BEARER_SCHEME: []}]
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    if _LOGIN_SCHEME in schemes:
        schemes[_BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`aiq_…`) or an access token, pasted as it is (routes that manage keys, "
            "sessions or users take an access token only)",
        }
    components = schema["components"].setdefault("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    if any(is_compat_path(path) for path in schema.get("paths", {})):
        # Referenced by the implied errors even where no route declared them, and by the streams' events.
        models = [(model, "serialization") for model in _BY_HAND.values()]
        _, defs = models_json_schema(models, ref_template=_REF_TEMPLATE)  # type: ignore[arg-type]
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
    _ordered_tags(schema)
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
