"""The ingest stage: a source split into parts, each fetched, validated and hashed into an image
shard and an errors shard."""

from typing import Any

from curate.core.shards import PartResult
from curate.core.stage import JobRun, Plan, Stage
from curate.stages.ingest.part import describe_part, ingest_part, summarize_ingest
from curate.stages.ingest.sources import Source, SourcePart, detect_source
from schemas.job import StageName


class IngestStage(Stage):
    name = StageName.INGEST

    def check(self, job: JobRun) -> str:
        # The source is checked before the job is recorded: an unreadable source starts nothing.
        source = detect_source(job.spec.source, job.spec.ingest.url_column)
        job.notes[self.name] = source
        return source.description

    def _source(self, job: JobRun) -> Source:
        if self.name not in job.notes:
            self.check(job)
        return job.notes[self.name]

    def plan(self, job: JobRun) -> Plan:
        options = job.spec.ingest
        source = self._source(job)
        return Plan(
            parts=source.parts(options.shard_size),
            # Counting a URL list's rows reads it once: only when the stage runs.
            total=source.parts_total(options.shard_size),
            inputs=(options, job.settings.crawl_settings(), job.stage_dir(self.name)),
        )

    def run_part(self, state: Any, part: SourcePart) -> PartResult:
        return ingest_part(part, *state)

    def describe(self, part: SourcePart) -> str:
        return describe_part(part)

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        metrics = summarize_ingest(job.shard_paths(self.name))
        return {**metrics, "skipped_files": self._source(job).skipped_files}


STAGE = IngestStage()
