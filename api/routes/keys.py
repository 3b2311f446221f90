"""API keys: create (the secret is shown once), list, revoke. Managed with an access token only."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from api.deps import HandlesDep, SessionDep, SessionUserId
from api.errors import error_responses
from api.routes import V1_PREFIX
from shared.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut
from shared.services import api_keys

router = APIRouter(prefix=f"{V1_PREFIX}/keys", tags=["api keys"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    responses=error_responses(401, 403, 409, 422, 503),
)
async def create(body: ApiKeyCreate, user_id: SessionUserId, session: SessionDep) -> ApiKeyCreated:
    """Create an API key; its secret is in this response only."""
    key, secret = await api_keys.create(session, user_id, body.name, list(body.scopes))
    return ApiKeyCreated(**ApiKeyOut.model_validate(key).model_dump(), key=secret)


@router.get("", response_model=list[ApiKeyOut], responses=error_responses(401, 403, 503))
async def list_(user_id: SessionUserId, session: SessionDep) -> list[ApiKeyOut]:
    """Your live API keys, newest first (prefix, name, scopes, created, last used)."""
    return [ApiKeyOut.model_validate(k) for k in await api_keys.list_keys(session, user_id)]


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404, 422, 503),
)
async def revoke(key_id: uuid.UUID, user_id: SessionUserId, session: SessionDep, handles: HandlesDep) -> Response:
    """Revoke a key: it stops working on every API process at once. Another user's key is a 404."""
    await api_keys.revoke(session, handles.redis, user_id, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
