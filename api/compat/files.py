"""`/v1/files`: batch input files in (multipart, streamed into the database), batch output files out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from api.compat import compat_router
from api.compat.errors import openai_error_responses
from api.deps import ConnectionDep, CurrentUserId, HandlesDep
from shared.errors import InvalidInput
from shared.schemas_openai import MAX_EXPIRES_SECONDS, MIN_EXPIRES_SECONDS, FileDeleted, FileList, FileObject
from shared.services import files as service

router = compat_router()

# The form `upload_file` reads itself, declared for the OpenAPI document.
_UPLOAD_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "JSONL: one request per line"},
                    "purpose": {"type": "string", "enum": ["batch"]},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {
                        "type": "integer",
                        "minimum": MIN_EXPIRES_SECONDS,
                        "maximum": MAX_EXPIRES_SECONDS,
                    },
                },
            }
        }
    },
    "required": True,
}


@router.post(
    "/files",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={200: {"model": FileObject, "description": "The stored file"}, **openai_error_responses(400)},
)
async def upload_file(request: Request, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """Upload a JSONL batch input file (a multipart form).

    The form: `file`, `purpose=batch`, optional `expires_after[anchor]` and `expires_after[seconds]`; at most
    MAX_FILE_BYTES (a 413) and MAX_BATCH_LINES (a 400).

    The form is read here, after the caller is authenticated (declared `File()`/`Form()` parameters would be
    parsed before the credentials are checked). The parser spools the file to a temporary file on disk, never
    all of it in memory; it is then copied into the database 1 MiB at a time.
    """
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise _missing("file", "a file part named 'file' is required")
        if not isinstance(purpose, str):
            raise _missing("purpose", "a form field named 'purpose' is required")
        expires = service.expires_after_seconds(
            _text(form.get("expires_after[anchor]")), _text(form.get("expires_after[seconds]"))
        )
        row = await service.upload(
            handles.pool,
            handles.settings,
            user_id,
            purpose=purpose,
            filename=upload.filename or "upload.jsonl",
            read=upload.read,
            expires_seconds=expires,
        )
    return service.file_object(row)


def _text(value: str | UploadFile | None) -> str | None:
    # A file part where a text field belongs is as invalid as an empty value.
    return value if value is None or isinstance(value, str) else ""


def _missing(field: str, message: str) -> InvalidInput:
    return InvalidInput(
        message, code="invalid_value", details=[{"loc": ["body", field], "msg": message, "type": "missing"}]
    )


@router.get(
    "/files", responses={200: {"model": FileList, "description": "A page of files"}, **openai_error_responses(404)}
)
async def list_files(
    user_id: CurrentUserId,
    conn: ConnectionDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> dict[str, Any]:
    """List your files, newest first; `after` is the last id of the previous page (an unknown one is a 404)."""
    return await service.list_page(conn, user_id, purpose=purpose, after=after, limit=limit)


@router.delete(
    "/files/{file_id}",
    responses={200: {"model": FileDeleted, "description": "Deleted"}, **openai_error_responses(404, 409)},
)
async def delete_file(file_id: str, user_id: CurrentUserId, conn: ConnectionDep) -> dict[str, Any]:
    """Delete a file and its content; a file a live batch still reads is a 409."""
    return await service.delete_file(conn, user_id, file_id)


@router.get(
    "/files/{file_id}", responses={200: {"model": FileObject, "description": "The file"}, **openai_error_responses(404)}
)
async def get_file(file_id: str, user_id: CurrentUserId, conn: ConnectionDep) -> dict[str, Any]:
    """Retrieve a file; anybody else's is a 404 like a missing one."""
    return service.file_object(await service.get_file(conn, user_id, file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's JSONL bytes",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
        },
        **openai_error_responses(404),
    },
)
async def get_file_content(file_id: str, user_id: CurrentUserId, handles: HandlesDep) -> StreamingResponse:
    """Retrieve a file's content, streamed one stored chunk at a time."""
    async with handles.pool.acquire() as conn:
        row = await service.get_file(conn, user_id, file_id)
    return StreamingResponse(
        service.content(handles.pool, row),
        media_type="application/jsonl",
        headers={"Content-Length": str(row["bytes"])},
    )
