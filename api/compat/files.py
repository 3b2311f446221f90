"""`/v1/files`: batch input files in (multipart, streamed into the database), batch output files out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import ConnectionDep, CurrentUserId, PoolDep, SettingsDep
from shared.services import files as service

router = APIRouter()


@router.post("/files")
async def upload_file(
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(max_length=32)],
    user_id: CurrentUserId,
    settings: SettingsDep,
    pool: PoolDep,
) -> dict[str, Any]:
    """A JSONL batch input file (purpose=batch): at most MAX_FILE_BYTES and MAX_BATCH_LINES lines.

    The form parser spools the file to a temporary file on disk (never all of it in memory); it is then copied
    into the database 1 MiB at a time.
    """
    row = await service.upload(
        pool, settings, user_id, purpose=purpose, filename=file.filename or "upload.jsonl", read=file.read
    )
    return service.file_object(row)


@router.get("/files/{file_id}")
async def get_file(file_id: str, user_id: CurrentUserId, conn: ConnectionDep) -> dict[str, Any]:
    """One of the caller's files; anybody else's is a 404 like a missing one."""
    return service.file_object(await service.get_file(conn, user_id, file_id))


@router.get("/files/{file_id}/content")
async def get_file_content(file_id: str, user_id: CurrentUserId, pool: PoolDep) -> StreamingResponse:
    """The file's bytes, streamed one stored chunk at a time."""
    async with pool.acquire() as conn:
        row = await service.get_file(conn, user_id, file_id)
    return StreamingResponse(
        service.content(pool, row),
        media_type="application/jsonl",
        headers={"Content-Length": str(row["bytes"])},
    )
