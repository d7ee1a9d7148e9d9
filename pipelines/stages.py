"""Each stage's driver side: split the input into parts, run them, record the stage."""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from curate.catalog import Catalog
from curate.dedup.copy_detection import warn_if_unweighted
from curate.dedup.decide import STAGE as DEDUP
from curate.dedup.decide import decide, write_decisions
from curate.dedup.features import STAGE as FEATURES
from curate.dedup.features import CopyModelSpec, dedup_features_part
from curate.ingest.sources import Source
from curate.ingest.stage import STAGE as INGEST
from curate.ingest.stage import describe_part, ingest_part, summarize_ingest
from curate.settings import Settings
from pipelines.eval_sets import load_eval_sets
from pipelines.runner import run_parts
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


def run_dedup(ctx: JobContext) -> None:
    options = ctx.spec.dedup
    job_dir = ctx.settings.job_dir(ctx.job_id)
    ingest = ctx.catalog.shards(ctx.job_id, INGEST)
    copy_model = copy_model_of(ctx.settings)
    warn_if_unweighted(copy_model.weights, copy_model.allow_random)
    eval_sets = load_eval_sets(ctx.spec.eval_sets, ctx.catalog, ctx.settings, copy_model)

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
        decided = ray.get(
            ray.remote(decide).remote(
                [s.path for s in ingest], feature_shards, options, eval_sets, job_dir / DEDUP
            )
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


STAGE_RUNNERS: dict[str, Callable[[JobContext], None]] = {INGEST: run_ingest, DEDUP: run_dedup}
