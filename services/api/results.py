"""The results router: what a job found, as a person browses it. Clusters and their members, a
seed image's neighbours, an image's provenance, the dedup groups, the centroid map and the
curated set's stats. The queries are curate/browse's; this module speaks HTTP.

Every endpoint is 404 when the job, or the stage output it shows, does not exist (yet).
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from curate.browse import queries
from curate.browse.store import Browser
from schemas.api import ErrorBody, Page
from services.api.deps import Cursor, Limit

router = APIRouter(tags=["results"])

_ERRORS = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        401: "no valid token",
        403: "the token lacks the scope",
        404: "no such job, or it has not produced this yet",
        422: "a parameter is invalid (named in error.field)",
    }.items()
}


def get_browser(request: Request) -> Browser:
    """The app's one Browser (curate/browse/store.py, made by create_app): its caches of built
    indexes and page layouts live as long as the app, and its IndexWarmer builds through it."""
    return request.app.state.browser


def _json(body: queries.Json) -> Response:
    """The stored JSON as it is: the index holds it in the response models' shapes, so it is
    neither parsed nor validated again (tests check the shapes against the models)."""
    return Response(body.text, media_type="application/json")


# -- response bodies ------------------------------------------------------------------------------


class Pick(BaseModel):
    """One retrieve row: the seed (set and image) that picked an image, and how."""

    seed_set: str
    seed_id: str | None = Field(description="null for cluster and balanced picks")
    method: str = Field(description="as-is | knn | cluster | balanced")
    similarity: float | None = Field(description="cosine to the seed (knn) or the centroid")
    rank: int | None = Field(description="0-based neighbour rank (knn), pick order otherwise")


class ClusterCard(BaseModel):
    cluster_id: int
    size: int = Field(description="crawl images in the cluster")
    seed_coverage: int = Field(description="seed images (all sets) nearest this centroid")
    seeds: dict[str, int] = Field(description="seed images per seed set")
    retrieved: dict[str, int] = Field(description="images retrieved per method")
    nearest: list[str] = Field(description="up to 8 crawl image ids nearest the centroid")


class Member(BaseModel):
    image_id: str
    distance: float | None = Field(description="1 - cosine to the centroid")
    seed_set: str | None = Field(description="the seed set it belongs to, if a seed image")
    retrieved: list[Pick]


class Neighbour(BaseModel):
    image_id: str
    similarity: float | None
    rank: int | None
    method: str
    cluster_id: int | None


class Neighbours(BaseModel):
    seed_set: str
    seed_id: str
    items: list[Neighbour]


class DedupDecision(BaseModel):
    keep: bool
    reason: str | None = Field(description="exact | pca_hash | copy | eval_contamination")
    group_id: str | None
    duplicate_of: str | None = Field(description="an image id, or '<eval set>:<image id>'")
    similarity: float | None
    occurrences: int = Field(description="times the image occurs in the source")


class Provenance(BaseModel):
    image_id: str
    cluster_id: int | None
    distance: float | None
    seed_sets: list[str] = Field(description="seed sets this image belongs to")
    picked_by: list[Pick]
    dedup: DedupDecision | None


class GroupMember(BaseModel):
    image_id: str
    uri: str | None
    keep: bool
    reason: str | None
    similarity: float | None
    duplicate_of: str | None


class DedupGroup(BaseModel):
    group_id: str
    representative: str = Field(description="the image kept for the group")
    size: int = Field(description="occurrences in the group (members lists the first 100)")
    reasons: list[str]
    members: list[GroupMember] = Field(description="the representative first")


class MapPoint(BaseModel):
    cluster_id: int
    x: float
    y: float
    size: int
    seed_coverage: int


class ClusterMap(BaseModel):
    clusters: list[MapPoint]
    explained_variance: list[float] = Field(description="share of variance on each axis")


# -- endpoints -------------------------------------------------------------------------------------

JobId = Annotated[str, Path(max_length=200)]
ClusterId = Annotated[int, Path(ge=0, le=2**31 - 1)]


@router.get(
    "/jobs/{job_id}/clusters",
    response_model=Page[ClusterCard],
    responses=_ERRORS,
    summary="clusters by size or seed coverage",
)
def list_clusters(
    request: Request,
    job_id: JobId,
    sort: Literal["size", "seed_coverage"] = "size",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    browser = get_browser(request)
    index = browser.results(job_id)
    return _json(queries.clusters(index, sort, limit, cursor).body)


@router.get(
    "/jobs/{job_id}/clusters/{cluster_id}/members",
    response_model=Page[Member],
    responses=_ERRORS,
    summary="a cluster's images, nearest the centroid first",
)
def list_members(
    request: Request,
    job_id: JobId,
    cluster_id: ClusterId,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    browser = get_browser(request)
    index = browser.results(job_id)
    return _json(queries.members(index, cluster_id, limit, cursor).body)


@router.get(
    "/jobs/{job_id}/seeds/{seed_set}/{seed_id}/neighbours",
    response_model=Neighbours,
    responses=_ERRORS,
    summary="the crawl images a seed image retrieved",
)
def seed_neighbours(
    request: Request,
    job_id: JobId,
    seed_set: Annotated[str, Path(max_length=200)],
    seed_id: Annotated[str, Path(max_length=200)],
) -> Response:
    browser = get_browser(request)
    index = browser.results(job_id)
    return _json(queries.neighbours(index, seed_set, seed_id))


@router.get(
    "/jobs/{job_id}/images/{image_id}/provenance",
    response_model=Provenance,
    responses=_ERRORS,
    summary="an image's cluster, the seeds that picked it and its dedup decision",
)
def image_provenance(
    request: Request, job_id: JobId, image_id: Annotated[str, Path(max_length=200)]
) -> Response:
    browser = get_browser(request)
    index = browser.results(job_id)
    return _json(queries.provenance(index, image_id))


@router.get(
    "/jobs/{job_id}/dedup/groups",
    response_model=Page[DedupGroup],
    responses=_ERRORS,
    summary="dedup groups, largest first, the kept representative first",
)
def dedup_groups(
    request: Request,
    job_id: JobId,
    reason: Annotated[
        Literal["exact", "pca_hash", "copy", "eval_contamination"] | None,
        Query(description="only groups holding a removal for this reason"),
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    browser = get_browser(request)
    index = browser.results(job_id)
    return _json(queries.dedup_groups(browser.cursor(), index, reason, limit, cursor).body)


@router.get(
    "/jobs/{job_id}/map",
    response_model=ClusterMap,
    responses=_ERRORS,
    summary="the cluster centroids in 2-D (PCA), computed once per job",
)
def cluster_map(request: Request, job_id: JobId) -> Response:
    return _json(queries.cluster_map(get_browser(request).results(job_id)))


@router.get(
    "/jobs/{job_id}/curated",
    response_model=dict[str, Any],
    responses=_ERRORS,
    summary="the curated dataset's stats (the dataset card's stats.json)",
)
def curated_stats(request: Request, job_id: JobId) -> Response:
    browser = get_browser(request)
    return _json(queries.curated_stats(browser.job_dir(job_id), job_id))
