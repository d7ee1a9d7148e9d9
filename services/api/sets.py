"""The sets router: seed sets (what retrieval finds look-alikes for) and evaluation sets (what
dedup removes copies of), listed, shown and registered.

Registering runs the checks `curate seeds add` and `curate eval-sets add` run, with the same
library functions and messages, plus one of the service's own: the location must lie under the
roots the operator allows (CURATE_SOURCE_ROOTS), checked before anything there is looked at.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, ConfigDict, Field

from curate.browse.sets import eval_set_rows, seed_set_row, seed_set_rows
from curate.catalog import Catalog
from curate.stages.ingest.confine import check_location
from curate.stages.ingest.sources import SourceError, detect_source
from curate.stages.retrieve.seed_sets import SeedSetError, check_name, registration
from schemas.api import ErrorBody
from schemas.job import SpecError, parse_job_spec
from services.api.deps import CatalogDep, ServiceDep

router = APIRouter(tags=["sets"])

_ERRORS = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        401: "no valid token",
        403: "the token lacks the scope",
        404: "no such set",
        409: "the name is registered otherwise (seed sets: send replace)",
        422: "a field is invalid (named in error.field)",
    }.items()
}


class SetCache(BaseModel):
    images: int | None = Field(description="images of its latest ingest (null: not yet used)")
    ingested: bool
    errors_by_reason: dict[str, int]
    embedded_with: list[str] = Field(description="models its embeddings are cached for")


class SeedSetInfo(BaseModel):
    name: str
    location: str | None = Field(description="null: a preset nobody registered yet")
    policy: str
    cap: int | None
    preset: bool
    registered: bool
    created_at: str | None
    description: str | None
    cache: SetCache


class SeedSetList(BaseModel):
    items: list[SeedSetInfo]


class SeedSetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="lowercase, digits, _ . - (a preset's name)")
    location: str = Field(max_length=4096, description="folder, glob, URL list, .tar or .parquet")
    policy: str | None = Field(
        None, max_length=200, description="as-is, knn:K, cluster:M, balanced:N joined by +"
    )
    # The upper bound keeps the catalog's BIGINT whole; the lower one is the CLI's check.
    cap: int | None = Field(
        None, le=10**15, description="most crawl images each policy step may pull"
    )
    replace: bool = Field(False, description="change a registered set")


class EvalSetInfo(BaseModel):
    name: str
    location: str


class EvalSetList(BaseModel):
    items: list[EvalSetInfo]


class EvalSetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="lowercase, digits, _ . -")
    location: str = Field(max_length=4096, description="folder, glob, URL list, .tar or .parquet")


def _field(error: Exception, field: str) -> Exception:
    error.field = field  # type: ignore[attr-defined]
    return error


def _register_seed_set(catalog: Catalog, roots: list, body: SeedSetRequest) -> dict[str, Any]:
    """`curate seeds add`, confined to the roots."""
    try:
        check_name(body.name)
    except SeedSetError as error:
        raise _field(error, "body.name") from None
    check_location(body.location, roots, field="body.location")
    try:
        location, policy, cap = registration(body.name, body.location, body.policy, body.cap)
    except SeedSetError as error:
        # registration() checks the policy, then the cap ("cap must be positive, ...").
        field = "body.cap" if str(error).startswith("cap ") else "body.policy"
        raise _field(error, field) from None
    try:
        detect_source(location)
    except SourceError as error:
        raise _field(error, "body.location") from None
    catalog.add_seed_set(body.name, location, policy, cap, replace=body.replace)
    return seed_set_row(catalog, body.name)


def _register_eval_set(catalog: Catalog, roots: list, body: EvalSetRequest) -> dict[str, Any]:
    """`curate eval-sets add`, confined to the roots."""
    try:
        parse_job_spec({"source": body.location, "eval_sets": [body.name]})
    except SpecError as error:
        raise _field(error, "body.name") from None
    check_location(body.location, roots, field="body.location")
    try:
        detect_source(body.location)
    except SourceError as error:
        raise _field(error, "body.location") from None
    catalog.add_eval_set(body.name, body.location)
    return {"name": body.name, "location": body.location}


@router.get(
    "/seed-sets",
    response_model=SeedSetList,
    responses=_ERRORS,
    summary="registered seed sets, then the presets not registered yet",
)
def list_seed_sets(catalog: CatalogDep) -> dict[str, Any]:
    return {"items": seed_set_rows(catalog)}


@router.get(
    "/seed-sets/{name}",
    response_model=SeedSetInfo,
    responses=_ERRORS,
    summary="one seed set: policy, location, cache state",
)
def show_seed_set(catalog: CatalogDep, name: Annotated[str, Path(max_length=200)]) -> dict:
    return seed_set_row(catalog, name)


@router.post(
    "/seed-sets",
    status_code=status.HTTP_201_CREATED,
    response_model=SeedSetInfo,
    responses=_ERRORS,
    summary="register a seed set (or a preset's location), as `curate seeds add`",
)
def add_seed_set(catalog: CatalogDep, service: ServiceDep, body: SeedSetRequest) -> dict:
    return _register_seed_set(catalog, service.source_roots, body)


@router.get(
    "/eval-sets",
    response_model=EvalSetList,
    responses=_ERRORS,
    summary="registered evaluation sets",
)
def list_eval_sets(catalog: CatalogDep) -> dict[str, Any]:
    return {"items": eval_set_rows(catalog)}


@router.post(
    "/eval-sets",
    status_code=status.HTTP_201_CREATED,
    response_model=EvalSetInfo,
    responses=_ERRORS,
    summary="register an evaluation set, as `curate eval-sets add`",
)
def add_eval_set(catalog: CatalogDep, service: ServiceDep, body: EvalSetRequest) -> dict:
    return _register_eval_set(catalog, service.source_roots, body)
