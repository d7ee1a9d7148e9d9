"""The jobs router: submit, list, read, cancel, resume and delete jobs; their errors, driver log
and progress events. The work is the job manager's (manager.py); this module speaks HTTP."""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from pipelines.recipes import RecipeError, load_recipe, merge
from schemas.api import (
    ErrorBody,
    ErrorRow,
    InvalidField,
    JobDetail,
    JobRequest,
    JobStatus,
    JobSummary,
    Page,
    decode_cursor,
    encode_cursor,
)
from schemas.job import JobSpec, StageName
from services.api.deps import CatalogDep, Cursor, Limit, ManagerDep, ServiceDep
from services.api.events import job_detail, job_events
from services.api.manager import POLL_STALE_S, request_sha256

router = APIRouter(tags=["jobs"])

_ERRORS = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        401: "no valid token",
        403: "the token lacks the scope",
        404: "no such job",
        409: "the job's state does not allow it",
        422: "a field is invalid (named in error.field)",
    }.items()
}
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        description=(
            "repeat a submission safely: the same key and body from the same token return "
            "the same job (keys are per token)"
        ),
    ),
]


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def _spec(body: JobRequest) -> tuple[JobSpec, dict[str, Any]]:
    """The body laid over its recipe, validated as one spec; and the body as sent."""
    sent = body.model_dump(mode="json", exclude_unset=True)
    fields = {key: value for key, value in sent.items() if key != "recipe"}
    try:
        recipe = load_recipe(body.recipe) if body.recipe else {}
    except RecipeError as error:
        raise InvalidField(str(error), field="body.recipe", code=error.code) from None
    try:
        return JobSpec.model_validate(merge(recipe, fields)), sent
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("body", *item["loc"])} for item in error.errors()]
        ) from None


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": JobDetail, "description": "a repeated Idempotency-Key"}, **_ERRORS},
    summary="submit a job",
)
def submit_job(
    body: JobRequest,
    request: Request,
    response: Response,
    manager: ManagerDep,
    idempotency_key: IdempotencyKey = None,
) -> JobDetail:
    spec, sent = _spec(body)
    manager.check_request(spec)
    # Keys are per caller: another token's key of the same name is another request.
    token = getattr(request.state, "token", None)
    scope = token["token_id"] if token else ""
    job_id, created = manager.submit(spec, idempotency_key, request_sha256(sent), scope)
    if not created:
        response.status_code = status.HTTP_200_OK
    return job_detail(manager.detail(job_id))


@router.get("/jobs", responses=_ERRORS, summary="list jobs, newest first")
def list_jobs(
    catalog: CatalogDep,
    manager: ManagerDep,
    status: JobStatus | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[JobSummary]:
    manager.reconcile()
    after = None
    if cursor is not None:
        created, job_id = decode_cursor(cursor, 2)
        try:
            after = (datetime.fromisoformat(created), str(job_id))
        except (TypeError, ValueError):
            raise InvalidField("not a jobs cursor", field="query.cursor") from None
    jobs = catalog.list_jobs(
        status, _naive_utc(created_after), _naive_utc(created_before), after, limit + 1
    )
    page, more = jobs[:limit], len(jobs) > limit
    last = page[-1] if page else None
    return Page[JobSummary](
        items=[JobSummary.model_validate(job) for job in page],
        next_cursor=encode_cursor([last["created_at"].isoformat(), last["job_id"]])
        if more and last
        else None,
    )


@router.get("/jobs/{job_id}", responses=_ERRORS, summary="a job: status, stages, counts")
def get_job(job_id: str, manager: ManagerDep) -> JobDetail:
    return job_detail(manager.detail(job_id, max_stale_s=POLL_STALE_S))


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    summary="stop a running job; its committed parts stay",
)
def cancel_job(job_id: str, manager: ManagerDep) -> JobDetail:
    manager.cancel(job_id)
    return job_detail(manager.detail(job_id))


@router.post(
    "/jobs/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    summary="run a stopped job on from its committed parts",
)
def resume_job(job_id: str, manager: ManagerDep) -> JobDetail:
    manager.resume(job_id)
    return job_detail(manager.detail(job_id))


@router.delete(
    "/jobs/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ERRORS,
    summary="delete a job that is not running: its shards, folder and catalog rows",
)
def delete_job(job_id: str, manager: ManagerDep) -> None:
    manager.delete(job_id)


@router.get("/jobs/{job_id}/errors", responses=_ERRORS, summary="a job's error rows")
def job_errors(
    job_id: str,
    catalog: CatalogDep,
    stage: StageName | None = None,
    reason: Annotated[str | None, Query(max_length=100)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[ErrorRow]:
    catalog.job_spec(job_id)  # 404 for an unknown job
    after = tuple(decode_cursor(cursor, 3)) if cursor is not None else None
    if after is not None and not all(isinstance(value, int) for value in after):
        raise InvalidField("not an errors cursor", field="query.cursor")
    stages = [stage.value] if stage is not None else [s.value for s in StageName]
    rows = catalog.error_rows(job_id, stages, reason, after, limit + 1)  # type: ignore[arg-type]
    page, more = rows[:limit], len(rows) > limit
    return Page[ErrorRow](
        items=[ErrorRow.model_validate(row) for row in page],
        next_cursor=encode_cursor([page[-1][key] for key in ("stage_rank", "part", "item")])
        if more
        else None,
    )


@router.get(
    "/jobs/{job_id}/log",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, **_ERRORS},
    summary="the driver's log from a byte offset (X-Next-Offset: where to go on)",
)
def job_log(
    job_id: str, manager: ManagerDep, offset: Annotated[int, Query(ge=0)] = 0
) -> PlainTextResponse:
    chunk, next_offset = manager.log(job_id, offset)
    return PlainTextResponse(
        chunk.decode(errors="replace"), headers={"X-Next-Offset": str(next_offset)}
    )


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
    summary="progress as server-sent events, ending with the final state",
)
async def job_events_stream(
    job_id: str,
    manager: ManagerDep,
    service: ServiceDep,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> StreamingResponse:
    detail = await run_in_threadpool(manager.detail, job_id)
    return StreamingResponse(
        job_events(manager, service, job_id, detail, last_event_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
