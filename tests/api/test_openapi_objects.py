"""The `/v1` success bodies the OpenAPI document declares are the ones sent: real answers of each operation
validate against the operation's declared schema, which allows no key it does not name and lacks none it
requires."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from httpx_sse import connect_sse

from tests.compat.conftest import make_api_key
from tests.support.stack import Stack

REF = "#/components/schemas/"
ENDED = ("completed", "failed", "expired", "cancelled")


def _strict(node: Any) -> Any:
    """The document's schemas with `additionalProperties: false` on every object that names its properties."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


class Declared:
    """The document's declared success bodies of the `/v1` operations, as strict validators."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.components = _strict(copy.deepcopy(spec["components"]))

    def model(self, method: str, path: str) -> str:
        """The name of the schema the operation's 200 declares for JSON."""
        ref: str = self.spec["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"][
            "schema"
        ]["$ref"]
        assert ref.startswith(REF), ref
        return ref.removeprefix(REF)

    def stream_event(self, method: str, path: str) -> dict[str, Any]:
        """The schema the operation's 200 declares for one event of its `text/event-stream` answer."""
        event: dict[str, Any] = self.spec["paths"][path][method.lower()]["responses"]["200"]["content"][
            "text/event-stream"
        ]["schema"]
        return event

    def validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        """A strict validator of `schema` (a `$ref` into the document's components)."""
        return jsonschema.Draft202012Validator({**schema, "components": self.components})

    def errors(self, method: str, path: str, body: Any) -> list[str]:
        schema = {"$ref": f"{REF}{self.model(method, path)}", "components": self.components}
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]

    def check(self, method: str, path: str, response: httpx.Response, model: str) -> dict[str, Any]:
        """The answer's body, once it is a 200 of the declared `model` that validates against it."""
        assert response.status_code == 200, response.text
        assert self.model(method, path) == model
        body: dict[str, Any] = response.json()
        assert self.errors(method, path, body) == [], (method, path, body)
        return body


@pytest.fixture
def declared(stack: Stack) -> Declared:
    return Declared(httpx.get(f"{stack.api_url}/openapi.json").json())


@pytest.fixture
def v1(stack: Stack, client: httpx.Client, user: dict[str, Any]) -> Iterator[httpx.Client]:
    """An HTTP client on `/v1` with a fresh user's API key."""
    headers = {"Authorization": f"Bearer {make_api_key(client, user)}"}
    with httpx.Client(base_url=f"{stack.api_url}/v1", headers=headers, timeout=60) as c:
        yield c


def _events(v1: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """A streamed create's events, as (event name, data) pairs, read with an SSE client."""
    with connect_sse(v1, "POST", path, json=body) as source:
        return [(sse.event, sse.data) for sse in source.iter_sse()]


def _prompt(text: str = "") -> str:
    # Unique, so that no answer comes from the response cache.
    return f"{text} {uuid.uuid4()}"


def test_the_strict_schemas_refuse_a_key_too_many_or_too_few(declared: Declared) -> None:
    model = {"id": "sim-small", "object": "model", "created": 0, "owned_by": "aiq"}
    assert declared.errors("GET", "/v1/models/{model_id}", model) == []
    assert declared.errors("GET", "/v1/models/{model_id}", {**model, "extra": 1})
    assert declared.errors("GET", "/v1/models/{model_id}", {k: v for k, v in model.items() if k != "owned_by"})
    assert declared.errors("GET", "/v1/models/{model_id}", {**model, "object": "list"})


def test_chat_completions_and_models_answer_their_declared_objects(declared: Declared, v1: httpx.Client) -> None:
    listed = declared.check("GET", "/v1/models", v1.get("/models"), "ModelList")
    model_id = listed["data"][0]["id"]
    declared.check("GET", "/v1/models/{model_id}", v1.get(f"/models/{model_id}"), "Model")

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _prompt("hello")}]
    r = v1.post("/chat/completions", json={"model": model_id, "messages": messages})
    done = declared.check("POST", "/v1/chat/completions", r, "ChatCompletion")
    assert done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"] is not None
    # Cut off at its token cap: `length`.
    r = v1.post("/chat/completions", json={"model": model_id, "messages": messages[1:], "max_tokens": 1})
    assert (
        declared.check("POST", "/v1/chat/completions", r, "ChatCompletion")["choices"][0]["finish_reason"] == "length"
    )


def test_a_chat_streams_events_are_the_declared_chunks(declared: Declared, v1: httpx.Client) -> None:
    json_data, done = declared.stream_event("POST", "/v1/chat/completions")["properties"]["data"]["anyOf"]
    assert done == {"type": "string", "const": "[DONE]"}
    # A chunk, or the error object of a query that did not complete.
    chunk, error = json_data["contentSchema"]["anyOf"]
    assert (chunk, error) == ({"$ref": f"{REF}ChatCompletionChunk"}, {"$ref": f"{REF}OpenAIErrorBody"})
    validator = declared.validator(chunk)
    body = {
        "model": "sim-small",
        "messages": [{"role": "user", "content": _prompt("[[sim tokens=12 chunk_ms=5]] stream")}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = _events(v1, "/chat/completions", body)
    assert {name for name, _ in events} == {"message"}
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(payload) for _, payload in events[:-1]]
    # The opening chunk, the text, the finishing chunk and the usage chunk: every one as declared.
    assert len(chunks) > 3
    for chunk in chunks:
        assert [e.message for e in validator.iter_errors(chunk)] == [], chunk
    assert (chunks[-2]["choices"][0]["finish_reason"], chunks[-1]["choices"]) == ("stop", [])
    # The strict schema refuses what it does not declare.
    assert list(validator.iter_errors({**chunks[0], "undeclared": 1}))


def test_a_responses_streams_events_are_the_declared_events(declared: Declared, v1: httpx.Client) -> None:
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}")):
        data = declared.stream_event(method, path)["properties"]["data"]
        assert data["contentSchema"] == {"$ref": f"{REF}ResponseStreamEvent"}
    validator = declared.validator({"$ref": f"{REF}ResponseStreamEvent"})
    body = {"model": "sim-small", "input": _prompt("[[sim tokens=12 chunk_ms=5]] stream"), "stream": True}
    events = [(name, json.loads(data)) for name, data in _events(v1, "/responses", body)]
    for name, data in events:
        assert [e.message for e in validator.iter_errors(data)] == [], data
        assert name == data["type"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[-1][0] == "response.completed"
    # The declared event refuses one without its place in the stream.
    assert list(validator.iter_errors({"type": "response.created"}))


def test_responses_answer_their_declared_object_in_every_state(declared: Declared, v1: httpx.Client) -> None:
    path, one = "/v1/responses", "/v1/responses/{response_id}"
    r = v1.post("/responses", json={"model": "sim-small", "input": _prompt("foreground"), "instructions": "Be brief"})
    done = declared.check("POST", path, r, "ResponseObject")
    assert (done["status"], done["background"]) == ("completed", False)
    assert done["output"]
    assert done["usage"] is not None

    r = v1.post("/responses", json={"model": "sim-small", "input": _prompt("capped"), "max_output_tokens": 1})
    assert declared.check("POST", path, r, "ResponseObject")["status"] == "incomplete"

    r = v1.post("/responses", json={"input": _prompt("background"), "background": True, "metadata": {"k": "v"}})
    created = declared.check("POST", path, r, "ResponseObject")
    assert created["background"] is True
    assert created["status"] in ("queued", "in_progress", "completed")
    current = created
    deadline = time.monotonic() + 60
    while current["status"] not in ENDED and time.monotonic() < deadline:
        time.sleep(0.2)
        current = declared.check("GET", one, v1.get(f"/responses/{created['id']}"), "ResponseObject")
    assert current["status"] == "completed"
    # Cancelling a finished response returns it as it is.
    r = v1.post(f"/responses/{created['id']}/cancel")
    assert declared.check("POST", f"{one}/cancel", r, "ResponseObject")["status"] == "completed"

    r = v1.post("/responses", json={"input": _prompt("refused [[sim fail=400]]"), "background": True})
    failed = declared.check("POST", path, r, "ResponseObject")
    deadline = time.monotonic() + 60
    while failed["status"] not in ENDED and time.monotonic() < deadline:
        time.sleep(0.2)
        failed = declared.check("GET", one, v1.get(f"/responses/{failed['id']}"), "ResponseObject")
    assert failed["status"] == "failed"
    assert failed["error"] is not None

    r = v1.post("/responses", json={"input": _prompt("slow [[sim latency_ms=20000]]"), "background": True})
    slow = declared.check("POST", path, r, "ResponseObject")
    r = v1.post(f"/responses/{slow['id']}/cancel")
    assert declared.check("POST", f"{one}/cancel", r, "ResponseObject")["status"] in ("cancelled", "in_progress")

    r = v1.delete(f"/responses/{created['id']}")
    assert declared.check("DELETE", one, r, "ResponseDeleted")["deleted"] is True


def test_files_and_batches_answer_their_declared_objects(declared: Declared, v1: httpx.Client) -> None:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-small", "messages": [{"role": "user", "content": _prompt()}]},
        }
        for i in range(2)
    ]
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    r = v1.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    uploaded = declared.check("POST", "/v1/files", r, "FileObject")
    # No `expires_after`: BATCH_INPUT_EXPIRES_SECONDS (30 days).
    assert uploaded["expires_at"] == uploaded["created_at"] + 30 * 24 * 3600
    r = v1.post(
        "/files",
        files={"file": ("gone.jsonl", content)},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    )
    expiring = declared.check("POST", "/v1/files", r, "FileObject")
    assert expiring["expires_at"] is not None
    listed = declared.check("GET", "/v1/files", v1.get("/files"), "FileList")
    assert [f["id"] for f in listed["data"]] == [expiring["id"], uploaded["id"]]
    declared.check("GET", "/v1/files/{file_id}", v1.get(f"/files/{uploaded['id']}"), "FileObject")
    r = v1.delete(f"/files/{expiring['id']}")
    assert declared.check("DELETE", "/v1/files/{file_id}", r, "FileDeleted")["deleted"] is True

    body = {
        "input_file_id": uploaded["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
    }
    batch = declared.check("POST", "/v1/batches", v1.post("/batches", json=body), "Batch")
    assert batch["status"] == "validating"
    deadline = time.monotonic() + 120
    while batch["status"] not in ENDED and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = declared.check("GET", "/v1/batches/{batch_id}", v1.get(f"/batches/{batch['id']}"), "Batch")
    assert batch["status"] == "completed"
    assert batch["output_file_id"] is not None
    r = v1.get(f"/files/{batch['output_file_id']}")
    assert declared.check("GET", "/v1/files/{file_id}", r, "FileObject")["purpose"] == "batch_output"
    listed_batches = declared.check("GET", "/v1/batches", v1.get("/batches"), "BatchList")
    assert [b["id"] for b in listed_batches["data"]] == [batch["id"]]

    # A second batch of slow lines, cancelled while it validates or runs.
    for line in lines:
        line["body"]["messages"][0]["content"] = _prompt("slow [[sim latency_ms=20000]]")
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    r = v1.post("/files", files={"file": ("slow.jsonl", content)}, data={"purpose": "batch"})
    slow = declared.check("POST", "/v1/files", r, "FileObject")
    body = {"input_file_id": slow["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    other = declared.check("POST", "/v1/batches", v1.post("/batches", json=body), "Batch")
    assert other["metadata"] is None
    r = v1.post(f"/batches/{other['id']}/cancel")
    assert declared.check("POST", "/v1/batches/{batch_id}/cancel", r, "Batch")["status"] in ("cancelling", "cancelled")
