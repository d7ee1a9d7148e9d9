"""The job spec: the one description of a curation run that CLI flags, REST bodies and recipes
parse into."""

import re
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.errors import InputError


class StageName(StrEnum):
    """Every stage's name, in pipeline order: the one place a stage's name is written. It names
    the stage's folder under the job, its catalog rows and, for the stages a job can stop at, its
    options section of JobSpec."""

    INGEST = "ingest"
    # dedup's per-image features (hash inputs, copy descriptors): committed part by part of its
    # own, but run, configured and stopped at as part of dedup.
    DEDUP_FEATURES = "dedup_features"
    DEDUP = "dedup"
    EMBED = "embed"
    CLUSTER = "cluster"
    RETRIEVE = "retrieve"
    CURATED = "curated"


# The stages a job names (`until`, the options sections), in pipeline order.
STAGES: tuple[str, ...] = tuple(s.value for s in StageName if s is not StageName.DEDUP_FEATURES)
Stage = Literal[STAGES]  # type: ignore[valid-type]
# Stages that only make sense with seed sets to retrieve for.
SEEDED_STAGES = (StageName.RETRIEVE.value, StageName.CURATED.value)
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"

JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def new_job_id() -> str:
    """An id for a job given none: its start time and a little randomness (JOB_ID_PATTERN)."""
    return f"job-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class SpecError(InputError, ValueError):
    """A job spec that does not validate; the message names every offending field."""

    code = "job_spec_invalid"


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
    hash_bits: Literal[64, 128] = Field(128, description="PCA-hash code length")
    hamming_radius: int | None = Field(
        None, ge=0, le=32, description="near-duplicate radius (default: the hash's own)"
    )
    # 6 is the most the exact multi-index tables cover on one 64-bit word.
    word_radius: int | None = Field(
        None, ge=0, le=6, description="128-bit codes: candidate radius on each 64-bit word"
    )
    itq_iterations: int = Field(50, ge=0, description="ITQ rotation steps after PCA (0: none)")
    pca_sample: int = Field(100_000, ge=100, description="images the PCA basis is fitted on")
    copy_k: int = Field(64, ge=1, le=2048, description="neighbours searched per image")
    # Cosines mean something only for the model they were measured on: unset, a job runs at its
    # copy model's calibrated operating points (curate copy-model train writes them into the
    # model file), or at DINOv2's 0.6 / 0.45 for a model without calibration (published SSCD).
    # Normalised scores (with copy_background) sit around 0, so the threshold may be negative.
    copy_threshold: float | None = Field(
        None, gt=-1, lt=1, description="cosine above which a copy (default: the model's own)"
    )
    eval_threshold: float | None = Field(
        None, gt=0, lt=1, description="cosine to an eval image (default: the model's own)"
    )
    copy_batch_size: int = Field(32, ge=1)
    copy_background: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="a registered image set for SSCD score normalisation (eval-sets add)",
    )
    background_beta: float = Field(1.0, gt=0, description="SSCD normalisation weight")

    @model_validator(mode="after")
    def _normalised_threshold(self) -> "DedupOptions":
        # A model's calibrated point is a raw cosine; normalised scores sit around 0.
        if self.copy_background is not None and self.copy_threshold is None:
            raise ValueError(
                "copy_threshold: copy_background normalises the scores (they sit around 0), so "
                "give the threshold for them; a model's calibrated point is a raw cosine"
            )
        return self


class EmbedOptions(BaseModel):
    """The embedding model and how it runs. The weights file is a machine setting
    (CURATE_EMBED_WEIGHTS); its fingerprint is recorded with the stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # DINOv2 curated LVD-142M with a self-supervised ViT-H; timm names the architecture.
    arch: str = Field("vit_huge_patch14_224", min_length=1, description="timm architecture")
    image_size: int = Field(224, ge=16, le=1024, description="centre-crop side fed to the model")
    batch_size: int = Field(64, ge=1, le=4096)
    compile: bool = Field(False, description="torch.compile the model (GPU runs)")
    random_weights: bool = Field(
        False, description="run without CURATE_EMBED_WEIGHTS (demo, tests): meaningless retrieval"
    )


class ClusterOptions(BaseModel):
    """Spherical k-means of the embedded crawl."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_clusters: int | None = Field(
        None, ge=1, description="k-means clusters (default: scales with the number of images)"
    )
    niter: int = Field(20, ge=1, le=1000)
    points_per_centroid: int = Field(256, ge=1, description="k-means training sample per cluster")
    # Levels of the hierarchical k-means behind `balanced:N` policies, finest first.
    balanced_levels: list[int] | None = Field(
        None, description="cluster counts per level for balanced sampling (default: derived)"
    )
    seed: int = 0


# Crawl images per kNN index shard by default. A shard's searcher holds its IVF-PQ codes, the
# float16 copy that re-ranking reads (2d bytes a vector: 2.5 KiB at ViT-H's 1280-d) and its keys:
# ~28 GB at 10M, a node's share of memory; 1.2B images make 120 shards.
INDEX_SHARD_ROWS = 10_000_000


class RetrieveOptions(BaseModel):
    """The kNN index over the crawl and the cluster-based retrieval rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flat_max: int = Field(
        1_000_000, ge=1, description="crawls up to this size are searched exactly"
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists (default: from the crawl size)")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantizers (default: from dim)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed per query")
    # The crawl is cut by id range (runs of embed shards), so never more shards than embed parts.
    index_shards: int | None = Field(
        None,
        ge=1,
        description="kNN index shards, each built and searched by a worker of its own "
        "(default: one per index_shard_rows images)",
    )
    index_shard_rows: int = Field(
        INDEX_SHARD_ROWS, ge=1, description="crawl images per kNN index shard by default"
    )
    # DINOv2: "clusters that contain more than 3 images of the seed set".
    min_seeds: int = Field(3, ge=0, description="a cluster needs more seed images than this")
    seed: int = 0


class CuratedOptions(BaseModel):
    """The training-ready dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_size: int | None = Field(None, ge=1, description="sample down to this many images")
    rows_per_shard: int = Field(10_000, ge=1, le=1_000_000)
    seed: int = Field(0, description="shuffle and sampling seed")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    source: str = Field(min_length=1, description="folder, glob, URL list, .tar or .parquet")
    until: Stage | None = Field(
        None, description="last stage to run (default: curated with seed sets, cluster without)"
    )
    ingest: IngestOptions = IngestOptions()
    eval_sets: list[str] = Field(
        default_factory=list, description="registered evaluation sets whose copies are removed"
    )
    dedup: DedupOptions = DedupOptions()
    seeds: list[str] = Field(
        default_factory=list, description="registered seed sets to retrieve crawl images for"
    )
    embed: EmbedOptions = EmbedOptions()
    cluster: ClusterOptions = ClusterOptions()
    retrieve: RetrieveOptions = RetrieveOptions()
    curated: CuratedOptions = CuratedOptions()

    @field_validator("eval_sets", "seeds")
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

    @model_validator(mode="after")
    def _seeded(self) -> "JobSpec":
        if self.until in SEEDED_STAGES and not self.seeds:
            raise ValueError(f"stage {self.until!r} needs seed sets to retrieve for (seeds)")
        return self

    @property
    def last_stage(self) -> str:
        if self.until is not None:
            return self.until
        # Without seed sets the last stage that needs none: the crawl embedded and clustered.
        return STAGES[-1] if self.seeds else STAGES[STAGES.index(SEEDED_STAGES[0]) - 1]

    def stages(self) -> tuple[str, ...]:
        return STAGES[: STAGES.index(self.last_stage) + 1]


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
