"""The dedup stages: per-image features part by part, then one whole-job decision written back
per ingest part.

`dedup_features` hashes and describes the images of each ingest shard. `dedup` decides for the
whole job in one task on one node (groups span shards), then writes each ingest part's
decisions as its own committed part. The decision is deterministic for its inputs, so a re-run
after a crash rewrites the uncommitted parts exactly as the first run would.
"""

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.core.shards import PartResult, ShardRef
from curate.core.stage import JobRun, Plan, Stage
from curate.settings import Settings
from curate.stages.dedup.copy_detection import warn_if_unweighted
from curate.stages.dedup.decide import Decisions, decide, write_decisions
from curate.stages.dedup.eval_sets import check_eval_sets, load_eval_sets
from curate.stages.dedup.features import CopyModelSpec, dedup_features_part
from curate.stages.dedup.model_card import ModelCard, read_model_card, resolve_thresholds
from curate.stages.dedup.pca_hash.tables import table_pairs
from schemas.job import StageName


def copy_model_of(settings: Settings) -> CopyModelSpec:
    """The copy-descriptor model the machine's settings name (weights are a machine setting)."""
    card = read_model_card(settings.copy_weights)
    return CopyModelSpec(
        settings.copy_weights, settings.copy_arch, settings.allow_random_weights, card.input_size
    )


def _copy_model_metrics(copy_model: CopyModelSpec, card: ModelCard) -> dict[str, Any]:
    """What the dataset card says about the copy model: which file, how it was made, and the
    operating point it was calibrated to (the curve stays in the file)."""
    if not copy_model.enabled:
        return {"file": None}
    calibration = card.calibration or {}
    return {
        "file": str(copy_model.weights) if copy_model.weights else None,
        "random_weights": copy_model.weights is None,
        "summary": card.summary() if copy_model.weights else "random weights (tests only)",
        "made": card.made,
        "calibration": {k: v for k, v in calibration.items() if k != "curve"} or None,
    }


def _describe_shard(shard: ShardRef) -> str:
    return f"part {shard.index} ({shard.path})"


class DedupFeaturesStage(Stage):
    """Hash features and copy descriptors of every stored image, one ingest shard per part."""

    name = StageName.DEDUP_FEATURES
    reads = (StageName.INGEST,)
    section = StageName.DEDUP

    def check(self, job: JobRun) -> None:
        options = job.spec.dedup
        background = [options.copy_background] if options.copy_background else []
        check_eval_sets(job.spec.eval_sets + background, job.catalog, copy_model_of(job.settings))

    def plan(self, job: JobRun) -> Plan:
        ingest = job.shards(StageName.INGEST)
        copy_model = copy_model_of(job.settings)
        return Plan(
            parts=ingest,
            total=len(ingest),
            inputs=(job.spec.dedup, copy_model, job.stage_dir(self.name)),
            metrics={"copy_model": copy_model.fingerprint() if copy_model.enabled else "none"},
        )

    def prepare(self, job: JobRun, plan: Plan) -> None:
        copy_model = copy_model_of(job.settings)
        warn_if_unweighted(copy_model.weights, copy_model.allow_random)

    def run_part(self, state: Any, part: ShardRef) -> PartResult:
        return dedup_features_part(part, *state)

    def describe(self, part: ShardRef) -> str:
        return _describe_shard(part)


FEATURES_STAGE = DedupFeaturesStage()


@dataclass(frozen=True)
class _HashTablesOn:
    """The PCA-hash multi-index tables searched as parallel tasks sharing one copy of the codes
    (decide's `map_tables` hook); picklable, so the deciding task itself can fan out."""

    fan_out: Callable[[Callable[..., Any], Any, Sequence[Any]], list[Any]]

    def __call__(self, codes: Any, radius: int, count: int) -> list[Any]:
        return self.fan_out(table_pairs, codes, [(radius, table) for table in range(count)])


# Copy-graph queries per task: a job with more descriptors has its kNN search fanned out over
# the cluster in slices of this many (each task reads the one shared copy of the index and the
# descriptors from its node's object store); a smaller one searches in the deciding task.
COPY_SLICE_ROWS = 100_000


def _search_slice(search: Callable[[int, int], Any], start: int, stop: int) -> Any:
    return search(start, stop)


@dataclass(frozen=True)
class _SlicesOn:
    """The copy graph's query slices searched as parallel tasks sharing one copy of the search
    (decide's `map_slices` hook); a single slice is searched in place."""

    fan_out: Callable[[Callable[..., Any], Any, Sequence[Any]], list[Any]]

    def __call__(self, search: Callable[[int, int], Any], slices: list[tuple[int, int]]) -> list:
        if len(slices) == 1:
            return [search(*slices[0])]
        return self.fan_out(_search_slice, search, slices)


class DedupStage(Stage):
    """Exact, PCA-hash and copy duplicates and eval-set copies, decided once for the whole job."""

    name = StageName.DEDUP
    reads = (StageName.INGEST, StageName.DEDUP_FEATURES)

    def plan(self, job: JobRun) -> Plan:
        ingest = job.shards(StageName.INGEST)
        return Plan(parts=ingest, total=len(ingest))

    def prepare(self, job: JobRun, plan: Plan) -> None:
        options = job.spec.dedup
        copy_model = copy_model_of(job.settings)
        eval_sets = load_eval_sets(job.spec.eval_sets, job, copy_model, FEATURES_STAGE)
        background = (
            load_eval_sets([options.copy_background], job, copy_model, FEATURES_STAGE)[0]
            if options.copy_background
            else None
        )
        out_dir = job.stage_dir(self.name)
        card = read_model_card(copy_model.weights)
        thresholds = resolve_thresholds(options.copy_threshold, options.eval_threshold, card)
        decided: Decisions = job.compute.task(
            self.name,
            decide,
            [s.path for s in plan.parts],
            job.shard_paths(StageName.DEDUP_FEATURES),
            options,
            eval_sets,
            out_dir,
            scratch=Path(tempfile.gettempdir()),
            map_tables=_HashTablesOn(job.compute.fan_out),
            map_slices=_SlicesOn(job.compute.fan_out),
            slice_rows=COPY_SLICE_ROWS,
            copy_background=None if background is None else background.descriptors,
            background_beta=options.background_beta,
            thresholds=thresholds,
        )
        plan.inputs = (decided, out_dir)
        plan.metrics = decided.metrics | {"copy_model": _copy_model_metrics(copy_model, card)}

    def run_part(self, state: tuple[Decisions, Path], part: ShardRef) -> PartResult:
        return write_decisions(part, *state)

    def describe(self, part: ShardRef) -> str:
        return _describe_shard(part)


STAGE = DedupStage()
