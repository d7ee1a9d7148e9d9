"""The one executor: runs any stage (curate.core.stage.Stage) on Ray, part by part, exactly once.

Ray tasks and actors rather than Ray Data: a part is the unit of exactly-once (its shards and
error counts are registered in one catalog transaction once its files are in place), so the driver
must see each part finish by itself and commit it before it counts as done. Ray Data's streaming
executor hides that boundary behind its own block scheduling and has no per-input commit hook;
plain tasks with a bounded window of parts in flight give the same streaming, with memory bounded
by the window.

Stateless stages run one task per part. Stateful stages (a model, an index) run a pool of
long-lived actors that set up once; when the stage has a load step (embed's decode), parts are
loaded in ordinary one-CPU tasks and their results go straight from the loading worker to an
actor, so the actor only runs the model.
"""

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ray
from tqdm import tqdm

from curate.core.atomic import remove_leftovers
from curate.core.shards import PartResult
from curate.core.stage import JobRun, Part, PartWork, Stage, Worker
from curate.settings import Settings
from schemas.errors import CurateError, ErrorKind

# Parts queued per stateful worker: the next part is already local when one finishes.
_ACTOR_QUEUE = 2


class StageFailed(CurateError):
    """A stage stopped: a part or a whole-stage step failed. It carries the kind and code of
    the error that failed on the worker, when that was one of ours."""

    code = "stage_failed"


class JobCancelled(CurateError):
    """The driver was asked to stop (SIGTERM: a cancel from the service, or `kill`): the stage
    under way and the job are recorded `cancelled`; committed parts stay, and a re-run resumes."""

    kind = ErrorKind.CONFLICT
    code = "job_cancelled"


# Set by the driver's SIGTERM handler (pipelines/job.py), which then raises KeyboardInterrupt:
# the one exception Ray's blocking calls (ray.wait, ray.get) give way to; any other raised by a
# signal handler inside them is swallowed and the wait goes on.
STOP_REQUESTED = threading.Event()


def is_cancel(error: BaseException) -> bool:
    """Whether an exception is the driver's clean stop rather than a failure or a Ctrl-C."""
    return isinstance(error, JobCancelled) or (
        isinstance(error, KeyboardInterrupt) and STOP_REQUESTED.is_set()
    )


def init_ray(settings: Settings) -> None:
    """Join CURATE_RAY_ADDRESS's cluster, or start a local one; once per process."""
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level="WARNING")
    else:
        ray.init(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            include_dashboard=False,
            logging_level="WARNING",
        )


class PartProgress:
    """A stage's progress bar in parts, with the rows and error rows of the parts committed."""

    def __init__(self, label: str, total: int | None, initial: int, enabled: bool) -> None:
        self.rows_out = self.errors = 0
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=label,
            unit="part",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def committed(self, result: PartResult) -> None:
        self.rows_out += result.rows_out
        self.errors += result.errors
        self._bar.update(1)
        self._bar.set_postfix(rows=self.rows_out, errors=self.errors, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _failure(label: str, error: BaseException) -> StageFailed:
    """The error a worker raised (unwrapped from Ray's task and actor errors), as a StageFailed
    naming where it happened."""
    cause: BaseException = error
    # A task error carries our exception; an actor that died in __init__ carries its task error.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    kind = cause.kind if isinstance(cause, CurateError) else ErrorKind.INTERNAL
    code = cause.code if isinstance(cause, CurateError) else None
    return StageFailed(f"{label}: {type(cause).__name__}: {cause}", kind=kind, code=code)


# -- placement ------------------------------------------------------------------------------------


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _whole_node() -> dict[str, float]:
    """Ray resources of a one-off whole-stage task: the cores of the largest node (never the
    cluster's sum, which no node has) and a GPU when a node has one.

    A 1-CPU Ray task gets one OpenMP thread, so FAISS and BLAS would run single-threaded."""
    nodes = _alive_nodes()
    cpus = max((int(n["Resources"].get("CPU", 0)) for n in nodes), default=1)
    gpu = any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
    return {"num_cpus": max(1, cpus), "num_gpus": 1 if gpu else 0}


def _node_cpus() -> int:
    """The CPUs this worker's node gives Ray, bounded by the cores the process may run on."""
    node_id = ray.get_runtime_context().get_node_id()
    cores = len(os.sched_getaffinity(0))
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, min(cores, int(node["Resources"].get("CPU", cores))))
    return cores


# -- worker side ----------------------------------------------------------------------------------


def _run_stateless(work: PartWork, inputs: Any, part: Part) -> PartResult:
    return work.run_part(work.setup(inputs, Worker(cpus=1, gpu=False)), part)


def _load(work: PartWork, inputs: Any, part: Part) -> tuple[int, Any]:
    # Two returns: the driver waits on the small first one (and sees a failure there) without
    # ever fetching the loaded part, which goes straight from this worker to an actor.
    return part.index, work.load_part(inputs, part)


class _PoolWorker:
    """One long-lived worker of a stateful stage: sets up once, then runs parts."""

    def __init__(self, work: PartWork, inputs: Any, gpu: bool) -> None:
        self.work = work
        # A set-up that fails is reported by ready() as an ordinary task error carrying our own
        # exception; raised here it would reach the driver only as a traceback text.
        self.state: Any = None
        self.error: Exception | None = None
        try:
            self.state = work.setup(inputs, Worker(cpus=1 if gpu else _node_cpus(), gpu=gpu))
        except Exception as error:
            self.error = error

    def ready(self) -> None:
        if self.error is not None:
            raise self.error

    def run_part(self, part: Any) -> PartResult:
        return self.work.run_part(self.state, part)


# -- driver side ----------------------------------------------------------------------------------


class RayCompute:
    """The Compute a stage's driver-side steps get (curate.core.stage.Compute), over Ray."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def task(self, label: str, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        remote = ray.remote(**_whole_node())(work)
        try:
            return ray.get(remote.remote(*args, **kwargs))
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
            raise _failure(f"{label} failed", error) from None

    def fan_out(self, work: Callable[..., Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        return fan_out(work, shared, items)

    def map_parts(
        self,
        work: PartWork,
        inputs: Any,
        parts: Iterable[Part],
        *,
        label: str,
        commit: Callable[[PartResult], None],
        done: frozenset[int] = frozenset(),
        total: int | None = None,
    ) -> None:
        todo = (part for part in parts if part.index not in done)
        first = next(todo, None)
        if first is None:
            return  # everything committed: no worker to start, no model to load
        todo = itertools.chain([first], todo)
        bar = PartProgress(label, total, len(done), self.progress)
        try:
            if work.resources.stateful:
                _map_pool(work, inputs, todo, label, commit, bar)
            else:
                _map_tasks(work, inputs, todo, label, commit, bar)
        finally:
            bar.close()


def fan_out(work: Callable[..., Any], shared: Any, items: Sequence[Any]) -> list[Any]:
    """`[work(shared, *item) for item in items]` as Ray tasks sharing one copy of `shared`."""
    shared_ref = ray.put(shared)
    remote = ray.remote(work)
    return ray.get([remote.remote(shared_ref, *item) for item in items])


def _map_tasks(
    work: PartWork,
    inputs: Any,
    todo: Iterator[Part],
    label: str,
    commit: Callable[[PartResult], None],
    bar: PartProgress,
) -> None:
    """One task per part, a bounded window of them in flight."""
    cpus = work.resources.cpus
    # Ray re-runs a part whose worker died (OOM, lost node); an exception raised by our own code
    # is a bug or an unreadable source and stops the stage instead.
    remote = ray.remote(num_cpus=cpus, max_retries=3)(_run_stateless)
    # Two parts per slot keep every worker busy while the driver commits; the window bounds the
    # driver's memory whatever the number of parts.
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    shared = (ray.put(work), ray.put(inputs))
    pending: dict[ray.ObjectRef, Part] = {}

    def fill() -> None:
        while len(pending) < window and (part := next(todo, None)) is not None:
            pending[remote.remote(*shared, part)] = part

    try:
        fill()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ref)
            try:
                result: PartResult = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise _failure(f"{label} failed on {work.describe(part)}", error) from None
            commit(result)
            bar.committed(result)
            fill()
    finally:
        for ref in pending:
            ray.cancel(ref)


def _map_pool(
    work: PartWork,
    inputs: Any,
    todo: Iterator[Part],
    label: str,
    commit: Callable[[PartResult], None],
    bar: PartProgress,
) -> None:
    """A pool of stateful workers (one per GPU; on a CPU-only cluster one, given its node's
    cores), fed by load tasks when the stage has a load step."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if work.resources.gpus else 0
    actors_n = max(1, gpus)
    # Logical CPUs left for loading once each actor holds its own.
    load_slots = max(1, int(resources.get("CPU", 1)) - actors_n)
    # Loaded-or-loading parts not yet at an actor: bounds memory to a few loaded parts.
    load_window = load_slots + actors_n
    actor_class = ray.remote(
        num_cpus=work.resources.cpus,
        num_gpus=work.resources.gpus if gpus else 0,
        max_restarts=1,
        max_task_retries=1,
    )(_PoolWorker)
    shared = (ray.put(work), ray.put(inputs))
    actors = [actor_class.remote(*shared, bool(gpus)) for _ in range(actors_n)]
    load = ray.remote(num_cpus=1, max_retries=3)(_load).options(num_returns=2)

    loading: dict[ray.ObjectRef, tuple[Part, ray.ObjectRef]] = {}
    ready: deque[tuple[Part, Any]] = deque()
    running: dict[ray.ObjectRef, tuple[Part, int]] = {}
    queued = [0] * actors_n

    def fill() -> None:
        while len(loading) + len(ready) < load_window and (part := next(todo, None)) is not None:
            if work.loads_parts:
                index_ref, loaded_ref = load.remote(*shared, part)
                loading[index_ref] = (part, loaded_ref)
            else:
                ready.append((part, part))
        while ready and min(queued) < _ACTOR_QUEUE:
            actor = queued.index(min(queued))
            part, payload = ready.popleft()
            running[actors[actor].run_part.remote(payload)] = (part, actor)
            queued[actor] += 1

    try:
        fill()
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            raise _failure(f"{label}: {work.describe_setup(inputs)}", error) from None
        while loading or running:
            (ref,), _ = ray.wait([*loading, *running], num_returns=1)
            if ref in loading:
                part, loaded_ref = loading.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise _failure(f"{label} failed on {work.describe(part)}", error) from None
                ready.append((part, loaded_ref))
            else:
                part, actor = running.pop(ref)
                queued[actor] -= 1
                try:
                    result: PartResult = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                    raise _failure(f"{label} failed on {work.describe(part)}", error) from None
                commit(result)
                bar.committed(result)
            fill()
    finally:
        for ref in loading:
            ray.cancel(ref)
        for actor in actors:
            # Frees the workers' (GPU) memory for the stages that follow.
            ray.kill(actor)


def run_stage(stage: Stage, job: JobRun) -> None:
    """Run one stage of a job, resuming: parts already committed are skipped, and a stage
    recorded done is not run again (its shards and metrics stand)."""
    catalog, name = job.catalog, stage.name
    if catalog.stage_status(job.job_id, name) != "done":
        started = time.perf_counter()
        try:
            plan = stage.plan(job)
            catalog.start_stage(job.job_id, name, plan.total)
            # A run killed mid-write leaves hidden temporary files; this driver alone runs the
            # stage now, so whatever is there is garbage.
            remove_leftovers(job.stage_dir(name))
            total = plan.total
            stage.prepare(job, plan)
            if plan.total != total:  # prepare counted the parts (the curated stage's buckets)
                catalog.start_stage(job.job_id, name, plan.total)
            job.compute.map_parts(
                stage,
                plan.inputs,
                plan.parts,
                label=name,
                commit=lambda result: catalog.commit_part(job.job_id, name, result),
                done=frozenset(catalog.committed_parts(job.job_id, name)),
                total=plan.total,
            )
            metrics = stage.summarize(job, plan)
        except BaseException as error:
            message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
            status = "failed"
            if is_cancel(error):
                message = status = "cancelled"
            catalog.finish_stage(
                job.job_id, name, status, time.perf_counter() - started, message=message
            )
            raise
        catalog.finish_stage(job.job_id, name, "done", time.perf_counter() - started, metrics)
    stage.finished(job)
