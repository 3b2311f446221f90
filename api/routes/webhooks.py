"""Webhooks: the account's endpoint and signing secret (access token only), a query's delivery log."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from api.deps import AutocommitSessionDep, CurrentUserId, HandlesDep, SessionDep, SessionUserId
from api.errors import error_responses
from api.routes import V1_PREFIX
from shared.queue import DELIVER_WEBHOOK_TASK
from shared.schemas import WebhookDeliveryOut, WebhookEndpointIn, WebhookEndpointOut, WebhookSecretOut
from shared.services import webhooks as service

router = APIRouter(prefix=f"{V1_PREFIX}/webhooks", tags=["webhooks"])
deliveries = APIRouter(prefix=f"{V1_PREFIX}/query", tags=["webhooks"])


@router.get("/endpoint", response_model=WebhookEndpointOut, responses=error_responses(401, 403, 404, 503))
async def get_endpoint(user_id: SessionUserId, session: SessionDep) -> WebhookEndpointOut:
    """The account's default endpoint: every query without its own `webhook_url` reports here when it ends."""
    return await service.get_endpoint(session, user_id)


@router.put("/endpoint", response_model=WebhookEndpointOut, responses=error_responses(401, 403, 422, 503))
async def put_endpoint(
    body: WebhookEndpointIn, user_id: SessionUserId, session: SessionDep, handles: HandlesDep
) -> WebhookEndpointOut:
    """Set the endpoint (enabling it again after a 410 disabled it). Sign-check with `GET /webhooks/secret`."""
    return await service.set_endpoint(session, handles.settings, user_id, body.url)


@router.delete(
    "/endpoint",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404, 503),
)
async def delete_endpoint(user_id: SessionUserId, session: SessionDep) -> Response:
    """Remove the endpoint; queries that name their own `webhook_url` still report there."""
    await service.delete_endpoint(session, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/secret", response_model=WebhookSecretOut, responses=error_responses(401, 403, 503))
async def get_secret(user_id: SessionUserId, session: SessionDep) -> WebhookSecretOut:
    """The `whsec_` secret that signs your webhooks (created on first request; readable again by you)."""
    return await service.get_secret(session, user_id)


@router.post("/secret/rotate", response_model=WebhookSecretOut, responses=error_responses(401, 403, 503))
async def rotate_secret(user_id: SessionUserId, session: SessionDep, handles: HandlesDep) -> WebhookSecretOut:
    """A new secret; the old one keeps signing beside it (two signatures) for WEBHOOK_SECRET_GRACE_SECONDS."""
    return await service.rotate_secret(session, handles.settings, user_id)


@deliveries.get(
    "/{query_id}/deliveries",
    response_model=list[WebhookDeliveryOut],
    summary="A query's webhook deliveries",
    responses=error_responses(401, 404, 422, 503),
)
async def list_deliveries(
    query_id: uuid.UUID, user_id: CurrentUserId, session: AutocommitSessionDep
) -> list[WebhookDeliveryOut]:
    """Each delivery with its attempts, last status code or error, and when it is tried next."""
    return await service.list_deliveries(session, user_id, query_id)


@deliveries.post(
    "/{query_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookDeliveryOut,
    summary="Send a webhook delivery again",
    responses=error_responses(401, 404, 409, 422, 503),
)
async def redeliver(
    query_id: uuid.UUID,
    delivery_id: uuid.UUID,
    user_id: CurrentUserId,
    session: AutocommitSessionDep,
    handles: HandlesDep,
) -> WebhookDeliveryOut:
    """One more attempt, now, with the same `webhook-id` and body (a failed, delivered or pending one alike)."""
    out = await service.redeliver(session, user_id, query_id, delivery_id)
    # The update has committed (autocommit): a failed publish leaves it to the workers' webhook sweep.
    await handles.publisher.publish(delivery_id, DELIVER_WEBHOOK_TASK)
    return out
