"""The job spec: the one description of a curation run that CLI flags, REST bodies and recipes
parse into."""

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Stages in pipeline order. A stage joins this tuple when it exists.
STAGES: tuple[str, ...] = ("ingest", "dedup")
Stage = Literal["ingest", "dedup"]
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"

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


class DedupOptions(BaseModel):
    """How near duplicates and copies are found. DINOv2's settings are the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: Literal["pca", "phash"] = Field("pca", description="PCA hash, or imagededup's PHash")
    hash_bits: Literal[64, 128] = 64
    hamming_radius: int | None = Field(
        None, ge=0, le=32, description="near-duplicate radius (default: the hash's own)"
    )
    itq_iterations: int = Field(50, ge=0, description="ITQ rotation steps after PCA (0: none)")
    pca_sample: int = Field(100_000, ge=100, description="images the PCA basis is fitted on")
    copy_k: int = Field(64, ge=1, le=2048, description="neighbours searched per image")
    copy_threshold: float = Field(0.6, gt=0, lt=1, description="cosine above which a copy")
    eval_threshold: float = Field(0.45, gt=0, lt=1, description="cosine to an eval image")
    copy_batch_size: int = Field(32, ge=1)


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    source: str = Field(min_length=1, description="folder, glob, URL list, .tar or .parquet")
    until: Stage = Field(STAGES[-1], description="last stage to run")
    ingest: IngestOptions = IngestOptions()
    eval_sets: list[str] = Field(
        default_factory=list, description="registered evaluation sets whose copies are removed"
    )
    dedup: DedupOptions = DedupOptions()

    @field_validator("eval_sets")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a set name (lowercase, digits, _ . -)")
        return sorted(set(value))

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
