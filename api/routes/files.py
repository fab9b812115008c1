"""The signed, expiring download route of ``file://`` storage (no API key: the link is the grant)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import ServicesDep
from shared.errors import not_found
from shared.signing import verify_file_token
from shared.storage import LocalStorage

router = APIRouter(prefix="/v1", tags=["files"])


@router.get("/files/{token}")
def download_file(token: str, services: ServicesDep) -> Response:
    """Download a result image through a signed link; invalid or expired links are 404."""
    storage = services.storage
    if not isinstance(storage, LocalStorage):
        raise not_found("File", "file_not_found")
    key = verify_file_token(token, storage.secret)
    found = storage.read(key) if key is not None else None
    if found is None:
        raise not_found("File (the link is invalid, expired or its file was removed)", "file_not_found")
    data, content_type = found
    return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})
