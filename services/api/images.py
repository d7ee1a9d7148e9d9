"""The images router: an image's original bytes and its thumbnail, found by image id through the
job's location index (curate/browse), never by scanning folders.

A thumbnail's name is its image id, the SHA-256 of the original bytes: it never changes, so it
is sent with an immutable cache header and the id as its ETag, and a browser that has it gets a
304 without the server reading anything but the cache folder.
"""

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from curate.browse import thumbs
from curate.browse.errors import ImageNotFound
from schemas.api import ErrorBody
from services.api.results import get_browser

router = APIRouter(tags=["images"])

_ERRORS = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        401: "no valid token",
        403: "the token lacks the scope",
        404: "no job holds this image",
        422: "a parameter is invalid, or the image's bytes are damaged",
    }.items()
}
IMMUTABLE = "public, max-age=31536000, immutable"
ImageId = Annotated[str, Path(max_length=200, description="hex SHA-256 of the image's bytes")]
JobParam = Annotated[
    str | None, Query(max_length=200, description="look in this job (default: the newest)")
]


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names this ETag (weak or strong), or is `*`."""
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


@router.get(
    "/images/{image_id}",
    responses={200: {"content": {"image/*": {}}, "description": "the bytes"}, **_ERRORS},
    response_class=Response,
    summary="an image's original bytes, with their content type",
)
def original(request: Request, image_id: ImageId, job: JobParam = None) -> Response:
    data, media_type = get_browser(request).image(image_id, job)
    return Response(
        data, media_type=media_type, headers={"Cache-Control": IMMUTABLE, "ETag": f'"{image_id}"'}
    )


@router.get(
    "/images/{image_id}/thumb",
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "a JPEG of at most 256 px a side"},
        304: {"description": "the client's copy (If-None-Match) is current"},
        **_ERRORS,
    },
    response_class=Response,
    summary="an image's thumbnail: made once, cached on disk and by browsers",
)
async def thumbnail(
    request: Request,
    image_id: ImageId,
    job: JobParam = None,
    if_none_match: Annotated[str | None, Header(max_length=8192)] = None,
) -> Response:
    browser = get_browser(request)
    if not thumbs.is_image_id(image_id):
        raise ImageNotFound(f"{image_id!r} is not an image id (64 hex digits)")
    etag = f'"{image_id}"'
    headers = {"Cache-Control": IMMUTABLE, "ETag": etag}
    path = thumbs.thumbnail_path(browser.thumb_dir, image_id)
    # Warm: one small file read on the event loop, cheaper than a hop to a worker thread.
    if path.exists():
        if _matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        try:
            return Response(path.read_bytes(), media_type="image/jpeg", headers=headers)
        except FileNotFoundError:
            pass  # the cache was cleared just now: make it again
    if _matches(if_none_match, etag):
        # No thumbnail here (a cleared cache): 304 only for an image some job holds.
        await run_in_threadpool(browser.locate, image_id, job)
        return Response(status_code=304, headers=headers)
    # Cold: decoding and scaling take milliseconds; a worker thread keeps the loop free.
    path = await run_in_threadpool(browser.thumbnail, image_id, job)
    return Response(path.read_bytes(), media_type="image/jpeg", headers=headers)
