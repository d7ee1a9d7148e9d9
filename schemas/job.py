"""The job spec: the one description of a curation run that CLI flags, REST bodies and recipes
parse into."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Stages in pipeline order. A stage joins this tuple when it exists.
STAGES: tuple[str, ...] = ("ingest",)
Stage = Literal["ingest"]

JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class SpecError(ValueError):
    """A job spec that does not validate; the message names every offending field."""


class IngestOptions(BaseModel):
    """What ingest accepts as an image. These change results, so they belong to the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard_size: int = Field(1000, ge=1, le=100_000, description="source items per shard")
    url_column: str = Field("url", min_length=1, description="URL column of tabular URL lists")
    min_side: int = Field(64, ge=1, description="reject images whose shorter side is smaller")
    max_aspect: float = Field(4.0, ge=1.0, description="reject longer/shorter side ratios above")
    max_side: int | None = Field(
        None, ge=16, description="downscale (and re-encode) images whose longer side is larger"
    )
    # Pillow's own warning threshold; anything larger is treated as a decompression bomb.
    max_pixels: int = Field(89_478_485, ge=1, description="reject images with more pixels")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    source: str = Field(min_length=1, description="folder, glob, URL list, .tar or .parquet")
    until: Stage = Field(STAGES[-1], description="last stage to run")
    ingest: IngestOptions = IngestOptions()

    @field_validator("source")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("source is empty")
        return value

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original one (`until` may grow)."""
        return self.model_dump(mode="json", exclude={"job_id", "until"})

    def stages(self) -> tuple[str, ...]:
        return STAGES[: STAGES.index(self.until) + 1]


def describe_validation_error(error: ValidationError) -> str:
    """One line per offending field, naming it by its dotted path."""
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "spec"
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field")
        else:
            lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)


def parse_job_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a job spec from plain data, raising SpecError with a readable message."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"invalid job spec: {describe_validation_error(error)}") from None
