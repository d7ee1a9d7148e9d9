"""The retrieve stage: crawl images picked for every seed set, one part per (seed set, policy
step), over a crawl kNN index and a balanced-sampling hierarchy built once for the job."""

from typing import Any

from curate.core.shards import PartResult
from curate.core.stage import JobRun, Plan, Stage
from curate.core.storage import portable, read_table
from curate.stages.cluster.centroids import fit_hierarchy
from curate.stages.embed.stage import embed_model_of
from curate.stages.retrieve.crawl_index import IndexOptions, open_crawl_index
from curate.stages.retrieve.parts import CrawlInputs, RetrievePart, retrieve_part
from curate.stages.retrieve.pinning import pin_seed_sets
from curate.stages.retrieve.policies import collisions
from curate.stages.retrieve.seed_cache import LoadedSeedSet, check_seed_sets, load_seed_sets
from schemas.job import StageName


def _has_policy(seed_sets: list[LoadedSeedSet], kind: str) -> bool:
    return any(step.kind == kind for s in seed_sets for step in s.policy)


class RetrieveStage(Stage):
    name = StageName.RETRIEVE
    reads = (StageName.EMBED, StageName.CLUSTER)

    def check(self, job: JobRun) -> None:
        check_seed_sets(job.spec.seeds, job.catalog)

    def plan(self, job: JobRun) -> Plan:
        options = job.spec.retrieve
        # Ingested and embedded with the job's model on first use, cached across jobs.
        seed_sets = load_seed_sets(job, embed_model_of(job.settings, job.spec))
        crawl = CrawlInputs(
            embed=tuple(job.shard_paths(StageName.EMBED)),
            cluster=tuple(job.shard_paths(StageName.CLUSTER)),
            cluster_dir=job.stage_dir(StageName.CLUSTER),
            index_dir=job.stage_dir(self.name) / "index",
        )
        index_options = IndexOptions(
            options.flat_max,
            options.nlist,
            options.pq_m,
            options.nprobe,
            options.seed,
            options.min_seeds,
            options.index_shards,
            options.index_shard_rows,
        )
        steps = ((s, step) for s in seed_sets for step in s.policy)
        parts = [
            RetrievePart(i, s.name, step, s.seed_set.cap, tuple(s.embed))
            for i, (s, step) in enumerate(steps)
        ]
        return Plan(
            parts=parts,
            total=len(parts),
            inputs=(crawl, index_options, job.stage_dir(self.name)),
            driver=seed_sets,
        )

    def prepare(self, job: JobRun, plan: Plan) -> None:
        seed_sets: list[LoadedSeedSet] = plan.driver
        crawl: CrawlInputs = plan.inputs[0]
        described = [s.seed_set.describe() | {"images": s.images} for s in seed_sets]
        root = job.settings.root
        ingest = {
            s.name: {str(part): portable(path, root) for part, path in s.ingest.items()}
            for s in seed_sets
        }
        # The embed shards too: browsing places each seed image among the job's clusters.
        embed = {s.name: [portable(path, root) for path in s.embed] for s in seed_sets}
        pin = {"seed_sets": described, "ingest": ingest, "embed": embed}
        pin_seed_sets(job.stage_dir(self.name), pin)
        plan.metrics["seed_sets"] = described
        if _has_policy(seed_sets, "knn"):
            # One searcher per index shard, shared by every kNN part through the inputs; none
            # when a resumed run has no kNN part left to search.
            done = job.catalog.committed_parts(job.job_id, self.name)
            parts: list[RetrievePart] = list(plan.parts)
            searchers, plan.metrics["index"] = open_crawl_index(
                job.compute,
                self.name,
                crawl.embed,
                crawl.index_dir,
                plan.inputs[1],
                search=any(p.step.kind == "knn" and p.index not in done for p in parts),
            )
            plan.inputs = (*plan.inputs, searchers)
        if _has_policy(seed_sets, "balanced"):
            cluster = job.spec.cluster
            plan.metrics |= job.compute.task(
                self.name,
                fit_hierarchy,
                list(crawl.embed),
                crawl.cluster_dir,
                levels=cluster.balanced_levels,
                n_clusters=cluster.n_clusters,
                niter=cluster.niter,
                points_per_centroid=cluster.points_per_centroid,
                seed=cluster.seed,
            )

    def run_part(self, state: tuple, part: RetrievePart) -> PartResult:
        return retrieve_part(part, *state)

    def describe(self, part: RetrievePart) -> str:
        return str(part)

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        retrieved = job.shard_paths(self.name)
        plan.metrics["collisions"] = collisions(
            read_table(path, ["image_id", "seed_set"]) for path in retrieved
        )
        return plan.metrics


STAGE = RetrieveStage()
