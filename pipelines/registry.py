"""The stages in pipeline order. Adding a stage is one package under curate/stages/ exporting its
stage object, its name in schemas.job.StageName, and one line here."""

from curate.core.stage import Stage
from curate.stages.cluster.stage import STAGE as CLUSTER
from curate.stages.curated.stage import STAGE as CURATED
from curate.stages.dedup.stage import FEATURES_STAGE as DEDUP_FEATURES
from curate.stages.dedup.stage import STAGE as DEDUP
from curate.stages.embed.stage import STAGE as EMBED
from curate.stages.ingest.stage import STAGE as INGEST
from curate.stages.retrieve.stage import STAGE as RETRIEVE
from schemas.job import JobSpec, StageName

STAGES: tuple[Stage, ...] = (
    INGEST,
    DEDUP_FEATURES,
    DEDUP,
    EMBED,
    CLUSTER,
    RETRIEVE,
    CURATED,
)

# Every name has its stage, in the same order: the registry and the names cannot drift apart.
assert [s.name for s in STAGES] == list(StageName), "pipelines/registry.py is out of order"


def job_stages(spec: JobSpec) -> list[Stage]:
    """The stages a job runs, in order: those of the spec's sections up to its last stage."""
    wanted = set(spec.stages())
    return [stage for stage in STAGES if stage.job_section() in wanted]
