"""The curated stage on Ray: select in one task, scatter per source shard, gather per bucket.

Only the gather step is committed to the catalog (one part per bucket, exactly once). Select and
scatter write intermediate files that are deterministic for the stage's inputs, so a resumed run
reuses what is there, redoes what is not, and gathers only the buckets not yet committed.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from curate.catalog import Catalog
from curate.stages.curated.assemble import (
    STAGE,
    Bucket,
    SourceShard,
    gather_bucket,
    remove_work_dir,
    scatter_path,
    scatter_source,
    select,
)
from pipelines.runner import map_parts, run_parts, run_task


def _resolve_ingest(
    source: SourceShard, ingest_path_of: Callable[[str, str, int], Path]
) -> SourceShard:
    try:
        path = Path(ingest_path_of(source.method, source.seed_set, source.part))
    except KeyError:
        where = f"seed set {source.seed_set!r}" if source.origin == "seed" else "the crawl"
        raise ValueError(
            f"retrieve rows point at ingest part {source.part} of {where}, which has no shard"
        ) from None
    return replace(source, ingest=path)


def _describe_source(source: SourceShard) -> str:
    return f"{source.origin} ingest part {source.part} ({source.ingest})"


def _describe_bucket(bucket: Bucket) -> str:
    return f"bucket {bucket.index} ({bucket.rows} images)"


def run_assemble(
    catalog: Catalog,
    job_id: str,
    *,
    retrieve_paths: list[Path],
    ingest_path_of: Callable[[str, str, int], Path],
    out_dir: Path,
    work_dir: Path,
    target_size: int | None,
    rows_per_shard: int,
    seed: int,
    progress: bool,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """Build the curated shards of a job from its retrieve shards; returns the stage's metrics.

    ingest_path_of(method, seed_set, part) names the INGEST shard holding an image's bytes.
    """
    # DuckDB runs where Ray puts it, off the driver, spilling under work_dir.
    selection = run_task(
        STAGE,
        select,
        list(retrieve_paths),
        work_dir,
        target_size=target_size,
        rows_per_shard=rows_per_shard,
        seed=seed,
        memory_limit=memory_limit,
    )
    catalog.start_stage(job_id, STAGE, len(selection.buckets))
    committed = catalog.committed_parts(job_id, STAGE)
    if any(b.index not in committed for b in selection.buckets):
        sources = [_resolve_ingest(s, ingest_path_of) for s in selection.sources]
        # A scatter file exists whole (it is renamed into place) and holds every bucket that
        # was uncommitted when it was written: a superset of the buckets still to gather.
        scattered = {s.index for s in sources if scatter_path(work_dir, s.index).is_file()}
        map_parts(
            sources,
            scatter_source,
            (work_dir, frozenset(committed)),
            done=scattered,
            commit=lambda _result: None,
            label=f"{STAGE} scatter",
            parts_total=len(sources),
            progress=progress,
            describe=_describe_source,
        )
        run_parts(
            catalog,
            job_id,
            STAGE,
            selection.buckets,
            gather_bucket,
            (work_dir, out_dir),
            parts_total=len(selection.buckets),
            progress=progress,
            describe=_describe_bucket,
        )
    committed = catalog.committed_parts(job_id, STAGE)
    missing = [b.index for b in selection.buckets if b.index not in committed]
    if missing:
        raise RuntimeError(f"{STAGE}: buckets {missing[:5]} are still uncommitted after gather")
    remove_work_dir(work_dir)
    return {
        "images": selection.rows,
        "shards": len(selection.buckets),
        "rows_per_shard": rows_per_shard,
        "target_size": target_size,
        "seed": seed,
        "selection": selection.counts,
    }
