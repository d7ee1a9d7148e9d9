"""The REST service's request and response bodies, shared by its routers (services/api/).

Every error body is `ErrorBody`; every list is a `Page` with an opaque cursor (`encode_cursor`,
`decode_cursor`); every time is ISO 8601 in UTC. A job is submitted as a `JobRequest` (a JobSpec
plus an optional recipe) and reported as `JobSummary` / `JobDetail`.
"""

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from schemas.errors import InputError
from schemas.job import JobSpec


def _utc(value: datetime) -> datetime:
    # The catalog stores naive UTC times.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcTime = Annotated[datetime, AfterValidator(_utc)]

JobStatus = Literal["created", "running", "cancelling", "done", "failed", "cancelled"]
StageStatus = Literal["running", "done", "failed", "cancelled"]
TokenScope = Literal["read", "write"]


class InvalidField(InputError, ValueError):
    """A request value the service refuses; `field` names it as pydantic would
    (`body.source`, `query.cursor`, `header.idempotency-key`)."""

    code = "invalid_field"

    def __init__(self, message: str, *, field: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


# -- errors -----------------------------------------------------------------------------------


class FieldMessage(BaseModel):
    field: str | None
    message: str


class ErrorDetail(BaseModel):
    kind: str = Field(description="schemas.errors.ErrorKind: input, not_found, conflict, ...")
    code: str = Field(description="stable: clients may match on it")
    message: str = Field(description="for people; may change")
    field: str | None = Field(None, description="the offending request field, dotted")
    details: list[FieldMessage] = Field(
        default_factory=list, description="every offending field, when there are several"
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- pages --------------------------------------------------------------------------------------


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


def encode_cursor(position: list[Any]) -> str:
    """An opaque cursor for a position in an ordering (JSON values)."""
    return base64.urlsafe_b64encode(json.dumps(position, default=str).encode()).decode()


def decode_cursor(cursor: str, length: int, field: str = "query.cursor") -> list[Any]:
    """The position an `encode_cursor` cursor holds; InvalidField if it is not one of ours."""
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, binascii.Error, UnicodeError):
        position = None
    if not isinstance(position, list) or len(position) != length:
        raise InvalidField(
            "not a cursor this service gave out: pass next_cursor from the previous page",
            field=field,
            code="cursor_invalid",
        )
    return position


# -- jobs ---------------------------------------------------------------------------------------


class JobRequest(JobSpec):
    """POST /v1/jobs: a JobSpec, optionally over a named recipe (the recipe's values stand
    where the body gives none, as `curate run --recipe` does)."""

    model_config = ConfigDict(extra="forbid")

    recipe: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="a built-in recipe: demo, lvd"
    )

    @model_validator(mode="after")
    def _seeded(self) -> "JobRequest":
        # The whole spec (recipe merged) is checked once merged; a recipe may bring the seeds.
        return self


class JobCounts(BaseModel):
    items_read: int | None = Field(description="source items ingest read (null: not yet)")
    images_kept: int | None = Field(description="images kept after dedup")
    images_embedded: int | None
    curated_images: int | None
    errors: int = Field(description="error rows over every stage")


class JobSummary(BaseModel):
    job_id: str
    status: JobStatus
    source: str
    created_at: UtcTime
    updated_at: UtcTime = Field(description="when anything about the job last changed")
    counts: JobCounts


class StageProgress(BaseModel):
    stage: str
    status: StageStatus
    parts_done: int
    parts_total: int | None
    rows_in: int
    rows_out: int
    errors: int
    errors_by_reason: dict[str, int]
    seconds: float
    started_at: UtcTime | None
    finished_at: UtcTime | None
    message: str | None
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobDetail(JobSummary):
    message: str | None
    spec: dict[str, Any] = Field(description="the JobSpec the job runs")
    stages: list[StageProgress]


class ErrorRow(BaseModel):
    uri: str
    stage: str
    reason: str
    detail: str | None
    part: int
    item: int


# -- auth and health ----------------------------------------------------------------------------


class TokenInfo(BaseModel):
    token_id: str
    name: str | None
    scope: TokenScope
    created_at: UtcTime
    revoked_at: UtcTime | None


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Printable ASCII: what `curate tokens create` makes, and what a cookie can carry.
    token: str = Field(min_length=1, max_length=512, pattern=r"^[!-~]+$")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    auth: bool = Field(description="whether requests need a token")
