"""Each stage's driver side: split the input into parts, run them, record the stage."""

import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray

from curate.catalog import Catalog
from curate.settings import Settings
from curate.stages.cluster.centroids import STAGE as CLUSTER
from curate.stages.cluster.centroids import cluster_part, fit_centroids, fit_hierarchy
from curate.stages.curated.assemble import STAGE as CURATED
from curate.stages.curated.card import dataset_stats, write_dataset_card
from curate.stages.dedup.copy_detection import warn_if_unweighted
from curate.stages.dedup.decide import STAGE as DEDUP
from curate.stages.dedup.decide import decide, write_decisions
from curate.stages.dedup.eval_sets import load_eval_sets
from curate.stages.dedup.features import STAGE as FEATURES
from curate.stages.dedup.features import CopyModelSpec, dedup_features_part
from curate.stages.dedup.pca_hash import table_pairs
from curate.stages.embed.embedder import STAGE as EMBED
from curate.stages.embed.embedder import EmbedInput
from curate.stages.embed.model import ModelSpec
from curate.stages.ingest.part import STAGE as INGEST
from curate.stages.ingest.part import describe_part, ingest_part, summarize_ingest
from curate.stages.ingest.sources import Source
from curate.stages.retrieve.parts import STAGE as RETRIEVE
from curate.stages.retrieve.parts import (
    CrawlInputs,
    IndexOptions,
    RetrievePart,
    build_crawl_index,
    retrieve_part,
)
from curate.stages.retrieve.policies import collisions
from curate.stages.retrieve.seed_cache import LoadedSeedSet, load_seed_sets
from curate.stages.retrieve.seed_sets import SeedSetError
from pipelines.assembly import run_assemble
from pipelines.embedding import embed_parts
from pipelines.runner import run_parts, run_task
from schemas.job import JobSpec


@dataclass
class JobContext:
    spec: JobSpec
    settings: Settings
    catalog: Catalog
    source: Source

    @property
    def job_id(self) -> str:
        assert self.spec.job_id
        return self.spec.job_id


def _recorded(
    ctx: JobContext, stage: str, parts_total: Callable[[], int | None], body: Callable[[], dict]
) -> None:
    """Run a stage's body between start and finish records; a failure is recorded, then raised.

    A stage recorded as done is not run again: its shards and metrics stand.
    """
    if ctx.catalog.stage_status(ctx.job_id, stage) == "done":
        return
    ctx.catalog.start_stage(ctx.job_id, stage, parts_total())
    started = time.perf_counter()
    try:
        metrics = body()
    except BaseException as error:
        message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        ctx.catalog.finish_stage(
            ctx.job_id, stage, "failed", time.perf_counter() - started, message=message
        )
        raise
    ctx.catalog.finish_stage(ctx.job_id, stage, "done", time.perf_counter() - started, metrics)


def run_ingest(ctx: JobContext) -> None:
    options = ctx.spec.ingest
    stage_dir = ctx.settings.job_dir(ctx.job_id) / INGEST
    # Counting a URL list's rows reads it once: only when the stage runs, and only once.
    parts_total = functools.cache(lambda: ctx.source.parts_total(options.shard_size))

    def body() -> dict:
        run_parts(
            ctx.catalog,
            ctx.job_id,
            INGEST,
            ctx.source.parts(options.shard_size),
            ingest_part,
            (options, ctx.settings.crawl_settings(), stage_dir),
            parts_total=parts_total(),
            progress=ctx.settings.progress,
            describe=describe_part,
        )
        metrics = summarize_ingest(ctx.catalog.shard_paths(ctx.job_id, INGEST, "data"))
        return {**metrics, "skipped_files": ctx.source.skipped_files}

    _recorded(ctx, INGEST, parts_total, body)


def copy_model_of(settings: Settings) -> CopyModelSpec:
    return CopyModelSpec(settings.copy_weights, settings.copy_arch, settings.allow_random_weights)


def ray_tables(codes, radius: int, count: int) -> list:
    """The PCA-hash multi-index tables as Ray tasks sharing one copy of the codes."""
    shared = ray.put(codes)
    search = ray.remote(table_pairs)
    return ray.get([search.remote(shared, radius, t) for t in range(count)])


def run_dedup(ctx: JobContext) -> None:
    options = ctx.spec.dedup
    job_dir = ctx.settings.job_dir(ctx.job_id)
    ingest = ctx.catalog.shards(ctx.job_id, INGEST)
    copy_model = copy_model_of(ctx.settings)
    warn_if_unweighted(copy_model.weights, copy_model.allow_random)
    eval_sets = load_eval_sets(ctx.spec.eval_sets, ctx.catalog, ctx.settings, copy_model)
    background = (
        load_eval_sets([options.copy_background], ctx.catalog, ctx.settings, copy_model)[0]
        if options.copy_background
        else None
    )

    def features() -> dict:
        run_parts(
            ctx.catalog,
            ctx.job_id,
            FEATURES,
            ingest,
            dedup_features_part,
            (options, copy_model, job_dir / FEATURES),
            parts_total=len(ingest),
            progress=ctx.settings.progress,
        )
        return {"copy_model": copy_model.fingerprint() if copy_model.enabled else "none"}

    def decisions() -> dict:
        # One task sees every image: the groups span shards. Its output is deterministic, so a
        # re-run after a crash rewrites the uncommitted parts exactly as the first run would.
        feature_shards = ctx.catalog.shard_paths(ctx.job_id, FEATURES)
        decided = run_task(
            DEDUP,
            decide,
            [s.path for s in ingest],
            feature_shards,
            options,
            eval_sets,
            job_dir / DEDUP,
            scratch=Path(tempfile.gettempdir()),
            map_tables=ray_tables,
            copy_background=None if background is None else background.descriptors,
            background_beta=options.background_beta,
            resources=_whole_node(),
        )
        run_parts(
            ctx.catalog,
            ctx.job_id,
            DEDUP,
            ingest,
            write_decisions,
            (decided, job_dir / DEDUP),
            parts_total=len(ingest),
            progress=ctx.settings.progress,
        )
        return decided.metrics

    _recorded(ctx, FEATURES, lambda: len(ingest), features)
    _recorded(ctx, DEDUP, lambda: len(ingest), decisions)


def embed_model_of(settings: Settings, spec: JobSpec) -> ModelSpec:
    options = spec.embed
    allow_random = settings.allow_random_weights or options.random_weights
    return ModelSpec(options.arch, settings.embed_weights, allow_random, options.image_size)


def run_embed(ctx: JobContext) -> None:
    options = ctx.spec.embed
    decisions = {s.index: s.path for s in ctx.catalog.shards(ctx.job_id, DEDUP)}
    inputs = [
        EmbedInput(s.index, s.path, decisions[s.index])
        for s in ctx.catalog.shards(ctx.job_id, INGEST)
    ]
    model = embed_model_of(ctx.settings, ctx.spec)

    def body() -> dict:
        embed_parts(
            inputs,
            model,
            out_dir=ctx.settings.job_dir(ctx.job_id) / EMBED,
            image_size=options.image_size,
            batch_size=options.batch_size,
            compile=options.compile,
            done=ctx.catalog.committed_parts(ctx.job_id, EMBED),
            commit=lambda result: ctx.catalog.commit_part(ctx.job_id, EMBED, result),
            parts_total=len(inputs),
            progress=ctx.settings.progress,
            stage=EMBED,
        )
        return {"model": model.fingerprint(), "random_weights": model.weights is None}

    _recorded(ctx, EMBED, lambda: len(inputs), body)


def _has_policy(seed_sets: list[LoadedSeedSet], kind: str) -> bool:
    return any(step.kind == kind for s in seed_sets for step in s.policy)


def _seed_sets(ctx: JobContext) -> list[LoadedSeedSet]:
    """The job's seed sets, ingested and embedded with the job's model (cached across jobs)."""
    return load_seed_sets(
        ctx.spec.seeds,
        ctx.catalog,
        ctx.settings,
        embed_model_of(ctx.settings, ctx.spec),
        ctx.spec.embed,
    )


def run_cluster(ctx: JobContext) -> None:
    options = ctx.spec.cluster
    out_dir = ctx.settings.job_dir(ctx.job_id) / CLUSTER
    embedded = ctx.catalog.shards(ctx.job_id, EMBED)
    embed_paths = [s.path for s in embedded]

    def body() -> dict:
        # Training sees a bounded sample in one task (on a GPU when the cluster has one).
        metrics = run_task(
            CLUSTER,
            fit_centroids,
            embed_paths,
            out_dir,
            n_clusters=options.n_clusters,
            niter=options.niter,
            points_per_centroid=options.points_per_centroid,
            seed=options.seed,
            resources=_whole_node(),
        )
        run_parts(
            ctx.catalog,
            ctx.job_id,
            CLUSTER,
            embedded,
            cluster_part,
            (out_dir / "centroids.npy", out_dir),
            parts_total=len(embedded),
            progress=ctx.settings.progress,
        )
        return metrics

    _recorded(ctx, CLUSTER, lambda: len(embedded), body)


def _whole_node() -> dict:
    """Ray resources of a one-off FAISS task: a node's cores and a GPU when the cluster has one.

    A 1-CPU Ray task gets one OpenMP thread, so FAISS and BLAS would run single-threaded."""
    resources = ray.cluster_resources()
    cores = max(1, min(os.cpu_count() or 1, int(resources.get("CPU", 1))))
    return {"num_cpus": cores, "num_gpus": 1 if resources.get("GPU", 0) >= 1 else 0}


def run_retrieve(ctx: JobContext) -> None:
    options = ctx.spec.retrieve
    job_dir = ctx.settings.job_dir(ctx.job_id)
    seed_sets = _seed_sets(ctx)
    crawl = CrawlInputs(
        embed=tuple(ctx.catalog.shard_paths(ctx.job_id, EMBED)),
        cluster=tuple(ctx.catalog.shard_paths(ctx.job_id, CLUSTER)),
        cluster_dir=job_dir / CLUSTER,
        index_dir=job_dir / RETRIEVE / "index",
    )
    index_options = IndexOptions(
        options.flat_max,
        options.nlist,
        options.pq_m,
        options.nprobe,
        options.seed,
        options.min_seeds,
    )
    parts = [
        RetrievePart(i, s.name, step, s.seed_set.cap, tuple(s.embed))
        for i, (s, step) in enumerate((s, step) for s in seed_sets for step in s.policy)
    ]

    def body() -> dict:
        described = [s.seed_set.describe() | {"images": s.images} for s in seed_sets]
        ingest = {
            s.name: {str(part): str(path) for part, path in s.ingest.items()} for s in seed_sets
        }
        _pin_seed_sets(job_dir / RETRIEVE, {"seed_sets": described, "ingest": ingest})
        metrics: dict = {"seed_sets": described}
        if _has_policy(seed_sets, "knn"):
            metrics["index"] = run_task(
                RETRIEVE, build_crawl_index, crawl, index_options, resources=_whole_node()
            )
        if _has_policy(seed_sets, "balanced"):
            cluster = ctx.spec.cluster
            metrics |= run_task(
                RETRIEVE,
                fit_hierarchy,
                list(crawl.embed),
                crawl.cluster_dir,
                levels=cluster.balanced_levels,
                n_clusters=cluster.n_clusters,
                niter=cluster.niter,
                points_per_centroid=cluster.points_per_centroid,
                seed=cluster.seed,
                resources=_whole_node(),
            )
        run_parts(
            ctx.catalog,
            ctx.job_id,
            RETRIEVE,
            parts,
            retrieve_part,
            (crawl, index_options, job_dir / RETRIEVE),
            parts_total=len(parts),
            progress=ctx.settings.progress,
        )
        retrieved = ctx.catalog.shard_paths(ctx.job_id, RETRIEVE)
        metrics["collisions"] = collisions(
            pq.read_table(path, columns=["image_id", "seed_set"]) for path in retrieved
        )
        return metrics

    _recorded(ctx, RETRIEVE, lambda: len(parts), body)


PINNED_SEED_SETS = "seed_sets.json"


def _pin_seed_sets(stage_dir: Path, pin: dict) -> None:
    """Record the seed sets a job retrieves for, and their ingest shards; a resume with other
    registrations is refused.

    Retrieve parts are numbered by (seed set, policy step), and as-is rows point into the seed
    set's ingest shards: re-registering a set between a crash and its resume would otherwise
    pair committed parts with other policies, or as-is rows with other shards.
    """
    pinned = stage_dir / PINNED_SEED_SETS
    if pinned.exists():
        before = json.loads(pinned.read_text())
        if before["seed_sets"] != pin["seed_sets"]:
            raise SeedSetError(
                f"the seed sets changed since this job started retrieving (was "
                f"{before['seed_sets']}, now {pin['seed_sets']}); run it under a new --job"
            )
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / ".seed_sets.json.tmp"
    tmp.write_text(json.dumps(pin, indent=2))
    tmp.replace(pinned)


def run_curated(ctx: JobContext) -> None:
    options = ctx.spec.curated
    job_dir = ctx.settings.job_dir(ctx.job_id)
    crawl_ingest = {s.index: s.path for s in ctx.catalog.shards(ctx.job_id, INGEST)}
    # The seed shards retrieval used, whatever the registry says now.
    pinned = json.loads((job_dir / RETRIEVE / PINNED_SEED_SETS).read_text())["ingest"]
    seed_ingest = {
        name: {int(part): Path(path) for part, path in shards.items()}
        for name, shards in pinned.items()
    }

    def ingest_path_of(method: str, seed_set: str, part: int) -> Path:
        # as-is images are the seed set's own; every other method picked a crawl image.
        return seed_ingest[seed_set][part] if method == "as-is" else crawl_ingest[part]

    def body() -> dict:
        return run_assemble(
            ctx.catalog,
            ctx.job_id,
            retrieve_paths=ctx.catalog.shard_paths(ctx.job_id, RETRIEVE),
            ingest_path_of=ingest_path_of,
            out_dir=job_dir / CURATED,
            work_dir=job_dir / CURATED / "_work",
            target_size=options.target_size,
            rows_per_shard=options.rows_per_shard,
            seed=options.seed,
            progress=ctx.settings.progress,
        )

    _recorded(ctx, CURATED, lambda: None, body)
    _write_card(ctx)


def _write_card(ctx: JobContext) -> None:
    """The dataset card: README.md and stats.json in the job folder, from the catalog's record."""
    report = ctx.catalog.job_report(ctx.job_id)
    stats = dataset_stats(
        report,
        curated=ctx.catalog.shard_paths(ctx.job_id, CURATED),
        cluster=ctx.catalog.shard_paths(ctx.job_id, CLUSTER),
    )
    write_dataset_card(
        ctx.settings.job_dir(ctx.job_id), stats, job_id=ctx.job_id, spec=report["spec"]
    )


STAGE_RUNNERS: dict[str, Callable[[JobContext], None]] = {
    INGEST: run_ingest,
    DEDUP: run_dedup,
    EMBED: run_embed,
    CLUSTER: run_cluster,
    RETRIEVE: run_retrieve,
    CURATED: run_curated,
}
