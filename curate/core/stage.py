"""The stage contract: what a pipeline stage declares and the steps the executor calls.

A stage is one object (one class per stage, in `curate/stages/<stage>/stage.py`) that says what
it is (its name, the stages it reads, its resources) and does its work in steps:

    check(job) -> note                before the job is recorded: refuse unusable input early
    plan(job) -> Plan                 driver: the parts still to produce and their shared inputs
    prepare(job, plan)                optional whole-stage step (fit a PCA basis, decide dedup
                                      groups, train k-means, build a kNN index), sent to a worker
                                      node through job.compute
    setup(inputs, worker) -> state    once per worker: load a model or an index
    load_part(inputs, part)           optional, for stateful stages: read and decode a part in a
                                      plain CPU task, so the model's worker only runs the model
    run_part(state, part) -> PartResult
    summarize(job, plan) -> metrics   driver: what the catalog records for the stage
    finished(job)                     driver, once the stage is recorded done (the dataset card)

The executor (pipelines/executor.py) runs every stage the same way: skip a stage recorded done,
plan, record the start, prepare, map the parts not yet committed (tasks, or an actor pool for a
stateful stage), commit each part's PartResult in one catalog transaction, summarize, record.
Nothing here imports Ray: the executor is the only code that knows how work is placed, and
`Compute` is all a stage sees of it.

Part steps run on workers: a stage object and its inputs must pickle, and part steps must not
touch the catalog (only drivers do).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from curate.core.shards import PartResult

if TYPE_CHECKING:
    from curate.catalog import Catalog
    from curate.settings import Settings
    from schemas.job import JobSpec


class Part(Protocol):
    """One unit of a stage's work: committed to the catalog whole, exactly once."""

    index: int


@dataclass(frozen=True)
class Resources:
    """What one part (or one worker of a stateful stage) asks of a node; never more than a node
    has.

    cpus: logical CPUs per part task (and held by each stateful worker).
    gpus: GPUs per stateful worker when the cluster has GPUs; without GPUs a stateful stage runs
        one worker that uses every core of its node.
    stateful: workers keep state (a model, an index) across parts, so parts go through a pool
        of long-lived workers instead of one task each.
    """

    cpus: float = 1
    gpus: float = 0
    stateful: bool = False


@dataclass(frozen=True)
class Worker:
    """Where a worker's `setup` runs: the cores it may use and whether it holds a GPU."""

    cpus: int
    gpu: bool


class ShardPool(Protocol):
    """Long-lived workers, one per shard of a structure too big for one process (the crawl's kNN
    index), each holding its shard's state. A pool pickles: part steps get it in their inputs
    and call it from wherever they run."""

    def map(self, method: str, *args: Any) -> list[Any]:
        """`[state.method(*args) for state in the shards' states]`, every shard at once, the
        results in shard order; the arguments are sent once."""
        ...


class LocalPool:
    """A ShardPool whose states are held in this process and called one after the other: for
    part steps given no pool (unit tests, benchmarks), and what an executor's pool must match."""

    def __init__(self, states: Sequence[Any]) -> None:
        self.states = list(states)

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(state, method)(*args) for state in self.states]


class Compute(Protocol):
    """What a stage's driver-side steps may ask of the executor."""

    def task(self, label: str, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `work(*args, **kwargs)` as one task on one node, with all of that node's cores
        and a GPU when the cluster has one (FAISS and BLAS then use every core)."""
        ...

    def map_parts(
        self,
        work: "PartWork",
        inputs: Any,
        parts: Iterable[Part],
        *,
        label: str,
        commit: Callable[[PartResult], None],
        done: frozenset[int] = frozenset(),
        total: int | None = None,
    ) -> None:
        """Run `work` over every part not in `done` (as the executor runs a stage's parts) and
        call `commit` in the driver with each result as it arrives."""
        ...

    def fan_out(self, work: Callable[..., Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        """`[work(shared, *item) for item in items]` as parallel tasks sharing one copy of
        `shared`; callable from inside a task too (dedup's hash tables are searched that way)."""
        ...

    def shard_pool(
        self,
        label: str,
        open: Callable[[Any, Worker], Any],
        shards: Sequence[Any],
        *,
        gpu: bool = False,
    ) -> ShardPool:
        """One long-lived worker per item of `shards`, placed round the nodes (with `gpu`, a
        share of a GPU each when the cluster has GPUs): `open(shard, worker)` runs once on it,
        and the pool's `map` calls methods of what it returned. Returns once every worker is
        open. A worker lost with its node is opened again on another; the pool lives until
        the stage ends."""
        ...


@dataclass
class Plan:
    """A stage's parts and what every part's worker gets.

    inputs: picklable, shipped to the workers once (the argument of `setup` and `load_part`).
    total: the number of parts, when known before they are produced (a progress bar's end).
    metrics: filled by `prepare`, recorded by `summarize`.
    driver: driver-only state between steps (never shipped to workers).
    """

    parts: Iterable[Part]
    inputs: Any = None
    total: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    driver: Any = None


@dataclass
class JobRun:
    """A job as its stages' driver-side steps see it."""

    spec: "JobSpec"
    settings: "Settings"
    catalog: "Catalog"
    compute: Compute
    # Driver-side values a stage works out once per run (in `check`) and reuses in later steps,
    # keyed by stage name: a source listed once, not once per step.
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        assert self.spec.job_id, "a running job has an id"
        return self.spec.job_id

    @property
    def job_dir(self) -> Path:
        return self.settings.job_dir(self.job_id)

    def stage_dir(self, stage: str) -> Path:
        return self.job_dir / stage

    def shards(self, stage: str, kind: str = "data"):
        """A stage's registered shards of this job (ShardRefs, in part order)."""
        return self.catalog.shards(self.job_id, stage, kind)

    def shard_paths(self, stage: str, kind: str = "data") -> list[Path]:
        return self.catalog.shard_paths(self.job_id, stage, kind)


class PartWork(ABC):
    """Work mapped over parts: the per-worker half of a stage (and of the few part maps that
    are not stages, such as the curated stage's scatter).

    The defaults describe a stateless map: no set-up, no separate load step.
    """

    resources: ClassVar[Resources] = Resources()
    # True when `load_part` runs before `run_part` (stateful stages only): the executor then
    # decodes parts in CPU tasks and hands the result to the pool's workers.
    loads_parts: ClassVar[bool] = False

    def setup(self, inputs: Any, worker: Worker) -> Any:
        """Per-worker state (a loaded model or index); by default the inputs themselves."""
        return inputs

    def load_part(self, inputs: Any, part: Part) -> Any:
        """Read a part for a stateful worker; only called when `loads_parts`."""
        return part

    @abstractmethod
    def run_part(self, state: Any, part: Any) -> PartResult:
        """Produce one part's shards. `part` is what `load_part` returned when `loads_parts`."""

    def describe(self, part: Part) -> str:
        """A short label for progress and error messages."""
        return f"part {part.index}"

    def describe_setup(self, inputs: Any) -> str:
        """What a worker's set-up does, for the message when it fails."""
        return "setting up a worker"


class Stage(PartWork):
    """A pipeline stage. Subclasses set `name` and `reads` and define `plan` and `run_part`."""

    name: ClassVar[str]
    # Upstream stages whose shards this stage reads.
    reads: ClassVar[tuple[str, ...]] = ()
    # The JobSpec section (and `until` value) the stage belongs to; its own name by default.
    section: ClassVar[str | None] = None

    @classmethod
    def job_section(cls) -> str:
        return cls.section or cls.name

    def check(self, job: "JobRun") -> str | None:
        """Refuse a job this stage cannot run, before anything is recorded or computed; returns
        a line for the job's log (what it found), or None."""
        return None

    @abstractmethod
    def plan(self, job: JobRun) -> Plan:
        """The parts still to produce (the executor skips the committed ones) and their inputs."""

    def prepare(self, job: JobRun, plan: Plan) -> None:
        """The whole-stage step, between planning and the parts; may replace `plan.inputs`,
        `plan.parts` and `plan.total`. It must be deterministic for the stage's inputs: after a
        crash it runs again and the parts already committed must still fit what it gives."""

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        """The metrics the catalog records for the stage once every part is committed."""
        return plan.metrics

    def finished(self, job: JobRun) -> None:
        """Runs once the stage is recorded done, on every run of the job that includes it."""
