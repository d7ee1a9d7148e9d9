"""The curated stage: select in one task, scatter per source shard, gather per bucket.

Only the gather step is committed to the catalog (one part per bucket, exactly once). Select and
scatter write intermediate files that are deterministic for the stage's inputs, so a resumed run
reuses what is there, redoes what is not, and gathers only the buckets not yet committed. Once
the stage is recorded, the job's dataset card (README.md, stats.json) is written beside it.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

from curate.core import storage
from curate.core.shards import PartResult
from curate.core.stage import JobRun, PartWork, Plan, Stage
from curate.stages.curated.card import dataset_stats, write_dataset_card
from curate.stages.curated.layout import remove_work_dir, scatter_path
from curate.stages.curated.select import Bucket, Selection, SourceShard, select
from curate.stages.curated.shuffle import gather_bucket, scatter_source
from curate.stages.retrieve.pinning import pinned_seed_ingest
from schemas.errors import InternalError
from schemas.job import StageName


class Scatter(PartWork):
    """The scatter step's part work: one source shard's selected images split by bucket."""

    def run_part(self, state: tuple[Path, frozenset[int]], part: SourceShard) -> PartResult:
        return scatter_source(part, *state)

    def describe(self, part: SourceShard) -> str:
        return f"{part.origin} ingest part {part.part} ({part.ingest})"


SCATTER = Scatter()


def _ingest_paths(job: JobRun) -> dict[str, Any]:
    """Where the selected images' bytes are: as-is images are the seed set's own (in the shards
    retrieval pinned), every other method picked a crawl image."""
    return {
        "crawl": {s.index: s.path for s in job.shards(StageName.INGEST)},
        "seeds": pinned_seed_ingest(job.stage_dir(StageName.RETRIEVE), job.settings.root),
    }


def _resolve_ingest(source: SourceShard, paths: dict[str, Any]) -> SourceShard:
    try:
        if source.method == "as-is":
            path = paths["seeds"][source.seed_set][source.part]
        else:
            path = paths["crawl"][source.part]
    except KeyError:
        where = f"seed set {source.seed_set!r}" if source.origin == "seed" else "the crawl"
        raise ValueError(
            f"retrieve rows point at ingest part {source.part} of {where}, which has no shard"
        ) from None
    return replace(source, ingest=Path(path))


class CuratedStage(Stage):
    name = StageName.CURATED
    reads = (StageName.RETRIEVE, StageName.INGEST)

    def _work_dir(self, job: JobRun) -> Path:
        return job.stage_dir(self.name) / "_work"

    def plan(self, job: JobRun) -> Plan:
        # The buckets (parts) are known once the selection is made, in `prepare`.
        work_dir = self._work_dir(job)
        return Plan(parts=[], inputs=(work_dir, job.stage_dir(self.name)))

    def prepare(self, job: JobRun, plan: Plan) -> None:
        options = job.spec.curated
        work_dir = self._work_dir(job)
        # DuckDB runs where Ray puts it, off the driver, spilling under work_dir.
        selection: Selection = job.compute.task(
            self.name,
            select,
            job.shard_paths(StageName.RETRIEVE),
            work_dir,
            target_size=options.target_size,
            rows_per_shard=options.rows_per_shard,
            seed=options.seed,
        )
        plan.parts, plan.total, plan.driver = selection.buckets, len(selection.buckets), selection
        plan.metrics = {
            "images": selection.rows,
            "shards": len(selection.buckets),
            "rows_per_shard": options.rows_per_shard,
            "target_size": options.target_size,
            "seed": options.seed,
            "selection": selection.counts,
        }
        committed = frozenset(job.catalog.committed_parts(job.job_id, self.name))
        if all(b.index in committed for b in selection.buckets):
            return
        paths = _ingest_paths(job)
        sources = [_resolve_ingest(s, paths) for s in selection.sources]
        # A scatter file exists whole (it is renamed into place) and holds every bucket that was
        # uncommitted when it was written: a superset of the buckets still to gather.
        job.compute.map_parts(
            SCATTER,
            (work_dir, committed),
            sources,
            label=f"{self.name} scatter",
            commit=lambda _result: None,
            done=frozenset(
                s.index for s in sources if storage.exists(scatter_path(work_dir, s.index))
            ),
            total=len(sources),
        )

    def run_part(self, state: tuple[Path, Path], part: Bucket) -> PartResult:
        return gather_bucket(part, *state)

    def describe(self, part: Bucket) -> str:
        return f"bucket {part.index} ({part.rows} images)"

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        committed = job.catalog.committed_parts(job.job_id, self.name)
        missing = [b.index for b in plan.parts if b.index not in committed]
        if missing:
            raise InternalError(
                f"{self.name}: buckets {missing[:5]} are still uncommitted after gather"
            )
        remove_work_dir(self._work_dir(job))
        return plan.metrics

    def finished(self, job: JobRun) -> None:
        """The dataset card: README.md and stats.json in the job folder, from the catalog."""
        report = job.catalog.job_report(job.job_id)
        stats = dataset_stats(
            report,
            curated=job.shard_paths(self.name),
            cluster=job.shard_paths(StageName.CLUSTER),
        )
        write_dataset_card(job.job_dir, stats, job_id=job.job_id, spec=report["spec"])


STAGE = CuratedStage()
