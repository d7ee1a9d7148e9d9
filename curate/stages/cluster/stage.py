"""The cluster stage: spherical k-means centroids fitted once on a bounded sample (one task on
one node), then every embed part assigned to its nearest centroid in a task of its own."""

from pathlib import Path
from typing import Any

from curate.core.shards import PartResult, ShardRef
from curate.core.stage import JobRun, Plan, Stage
from curate.stages.cluster.centroids import CENTROIDS, cluster_part, fit_centroids
from schemas.job import StageName


class ClusterStage(Stage):
    name = StageName.CLUSTER
    reads = (StageName.EMBED,)

    def plan(self, job: JobRun) -> Plan:
        embedded = job.shards(StageName.EMBED)
        out_dir = job.stage_dir(self.name)
        return Plan(parts=embedded, total=len(embedded), inputs=(out_dir / CENTROIDS, out_dir))

    def prepare(self, job: JobRun, plan: Plan) -> None:
        options = job.spec.cluster
        # Training sees a bounded sample in one task (on a GPU when the cluster has one).
        plan.metrics = job.compute.task(
            self.name,
            fit_centroids,
            [s.path for s in plan.parts],
            job.stage_dir(self.name),
            n_clusters=options.n_clusters,
            niter=options.niter,
            points_per_centroid=options.points_per_centroid,
            seed=options.seed,
        )

    def run_part(self, state: tuple[Path, Path], part: ShardRef) -> PartResult:
        return cluster_part(part, *state)

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        return plan.metrics


STAGE = ClusterStage()
