"""/v1/bundles: upload a code bundle (a zip of the user's folder), see whether one is stored."""

import zipfile

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, StateDep, UserDep, require_writer
from api.errors import ApiError
from api.openapi import errors
from api.schemas import BundlePublic
from service.bundles import HASH, BundleError

router = APIRouter(prefix="/v1/bundles", tags=["bundles"], dependencies=[AuthDep], responses=errors(401, 422))


@router.post("", status_code=201, response_model=BundlePublic, responses=errors(403, 413),
             openapi_extra={"requestBody": {"required": True, "content": {
                 # the zip's bytes, sent as application/zip or application/octet-stream (declared:
                 # clients and generators that know no zip media type send bytes as octet-stream)
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_bundle(request: Request, state: StateDep, user: UserDep) -> BundlePublic:
    """Store a zip of the code a run needs; answers its hash (name it as the spec's `code.bundle`).
    Uploading the same bytes again answers the same hash and stores nothing new. Viewers cannot."""
    require_writer(user)
    data = await request.body()
    try:
        info = await run_in_threadpool(state.bundles.put, data)
    except BundleError as exc:
        raise ApiError(exc.status_code, exc.entry, str(exc)) from None
    return BundlePublic(hash=info.hash, size=info.size, files=info.files)


@router.get("/{digest}", response_model=BundlePublic, responses=errors(404))
def get_bundle(digest: str, state: StateDep) -> BundlePublic:
    if not HASH.fullmatch(digest) or not state.bundles.exists(digest):
        raise ApiError(404, "digest", f"no bundle {digest[:80]!r}")
    path = state.bundles.path(digest)
    with zipfile.ZipFile(path) as archive:
        files = len(archive.infolist())
    return BundlePublic(hash=digest, size=path.stat().st_size, files=files)
