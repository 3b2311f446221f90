"""`GET /v1/models`: the models AIQ allows (ALLOWED_MODELS)."""

from __future__ import annotations

from typing import Any

from api.compat import compat_router
from api.compat.errors import openai_error_responses
from api.deps import CurrentUserId, HandlesDep
from shared.errors import NotFound
from shared.schemas_openai import Model, ModelList

router = compat_router()


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "aiq"}


@router.get("/models", responses={200: {"model": ModelList, "description": "The allowed models"}})
async def list_models(_: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """List the allowed models (ALLOWED_MODELS), as OpenAI lists models."""
    return {"object": "list", "data": [_model(m) for m in handles.settings.allowed_models]}


@router.get(
    "/models/{model_id:path}",
    responses={200: {"model": Model, "description": "The model"}, **openai_error_responses(404)},
)
async def get_model(model_id: str, _: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """Retrieve an allowed model; any other name is a 404."""
    if model_id not in handles.settings.allowed_models:
        raise NotFound(f"The model '{model_id[:200]}' does not exist", code="model_not_found")
    return _model(model_id)
