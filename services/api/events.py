"""A job's progress as server-sent events (GET /v1/jobs/{id}/events).

The stream polls the catalog (at most once a second) and sends `event: progress` with the job's
whole JobDetail whenever anything about the job changed, `event: heartbeat` when nothing was sent
for a while, and a last `event: end` with the final JobDetail once the job is done, failed or
cancelled. Event ids are the time of the job's last change in microseconds, so they only grow,
and across reconnections too: with `Last-Event-ID` the stream sends nothing until the job changes
after that id (or the end at once, if it has ended). Each event carries the whole state, so one
missed in between loses nothing.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool

from curate.catalog_service import TERMINAL
from schemas.api import JobDetail
from schemas.errors import CurateError
from services.api.manager import POLL_STALE_S, JobManager
from services.api.settings import ServiceSettings

RETRY_MS = 2000


def job_detail(detail: dict[str, Any]) -> JobDetail:
    """A catalog job detail as the API's JobDetail."""
    return JobDetail.model_validate({**detail, "source": detail["spec"]["source"]})


def event_id(detail: dict[str, Any]) -> int:
    """The job's last change, in microseconds since the epoch (naive UTC in the catalog)."""
    changed = datetime.fromisoformat(detail["updated_at"])
    return int((changed - datetime(1970, 1, 1)).total_seconds() * 1_000_000)


def _event(name: str, data: str, ident: int | None = None) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n"


async def job_events(
    manager: JobManager,
    service: ServiceSettings,
    job_id: str,
    detail: dict[str, Any],
    last_event_id: int | None,
) -> AsyncIterator[str]:
    """The event stream of one job, starting from `detail` (read before the response began,
    so an unknown job is a 404 and not an empty stream)."""
    yield f"retry: {RETRY_MS}\n\n"
    last = last_event_id
    quiet_since = time.monotonic()
    while True:
        ident = event_id(detail)
        body = job_detail(detail).model_dump_json()
        if detail["status"] in TERMINAL:
            yield _event("end", body, ident)
            return
        if last is None or ident > last:
            yield _event("progress", body, ident)
            last, quiet_since = ident, time.monotonic()
        elif time.monotonic() - quiet_since >= service.heartbeat_s:
            yield _event("heartbeat", json.dumps({"job_id": job_id}))
            quiet_since = time.monotonic()
        await asyncio.sleep(service.events_poll_s)
        try:
            detail = await run_in_threadpool(manager.detail, job_id, POLL_STALE_S)
        except CurateError as error:  # the job was deleted meanwhile
            yield _event("error", json.dumps({"error": error.to_dict()}))
            return
