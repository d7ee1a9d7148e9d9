"""Each stage's driver side: split the input into parts, run them, record the stage."""

import time
from collections.abc import Callable
from dataclasses import dataclass

from curate.catalog import Catalog
from curate.ingest.sources import Source
from curate.ingest.stage import STAGE as INGEST
from curate.ingest.stage import describe_part, ingest_part, summarize_ingest
from curate.settings import Settings
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


def _recorded(ctx: JobContext, stage: str, parts_total: int | None, body: Callable[[], dict]):
    """Run a stage's body between start and finish records; a failure is recorded, then raised."""
    ctx.catalog.start_stage(ctx.job_id, stage, parts_total)
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

    def body() -> dict:
        run_parts(
            ctx.catalog,
            ctx.job_id,
            INGEST,
            ctx.source.parts(options.shard_size),
            ingest_part,
            (options, ctx.settings.crawl_settings(), stage_dir),
            parts_total=parts_total,
            progress=ctx.settings.progress,
            describe=describe_part,
        )
        metrics = summarize_ingest(ctx.catalog.shard_paths(ctx.job_id, INGEST, "data"))
        return {**metrics, "skipped_files": ctx.source.skipped_files}

    parts_total = ctx.source.parts_total(options.shard_size)
    _recorded(ctx, INGEST, parts_total, body)


STAGE_RUNNERS: dict[str, Callable[[JobContext], None]] = {INGEST: run_ingest}
