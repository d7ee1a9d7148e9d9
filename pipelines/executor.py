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
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

import ray
from tqdm import tqdm

from curate.core import storage
from curate.core.atomic import remove_leftovers
from curate.core.shards import PartResult
from curate.core.stage import JobRun, Part, PartWork, Stage, Worker
from curate.settings import Settings
from pipelines.failures import StageFailed, failure, is_cancel
from pipelines.placement import (
    check_schedulable,
    node_cpus,
    pool_placements,
    resource_request,
    round_the_nodes,
    wait_all,
    wait_one,
    whole_node,
)
from pipelines.shard_pool import RayShardPool, start_shard_pool

# Parts queued per stateful worker: the next part is already local when one finishes.
_ACTOR_QUEUE = 2


def init_ray(settings: Settings) -> bool:
    """Join CURATE_RAY_ADDRESS's cluster, or start a local one; once per process. Returns
    whether this call did, and so whether its caller is the one to `stop_ray`."""
    if ray.is_initialized():
        return False
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level="WARNING")
    else:
        ray.init(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            include_dashboard=False,
            logging_level="WARNING",
        )
    return True


def stop_ray() -> None:
    """Stop the local Ray this process started, or leave the cluster it joined. Called by the
    driver once its job is recorded: left to Ray's exit hook, the stop first sleeps half a
    second for log lines that a driver of ours never waits for."""
    ray.shutdown()


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


def _stamped(result: PartResult) -> PartResult:
    """The part's result with the node that ran it (the catalog records it per part)."""
    result.node = ray.get_runtime_context().get_node_id()
    return result


# Every task and actor gets the driver's object store roots first (`Stores`), so that on any
# node its reads fetch from, and its writes upload to, the job's store (curate.core.storage).
Stores = tuple[storage.Store, ...]


def _call(stores: Stores, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    storage.register_all(stores)
    return work(*args, **kwargs)


def _run_stateless(stores: Stores, work: PartWork, inputs: Any, part: Part) -> PartResult:
    storage.register_all(stores)
    return _stamped(work.run_part(work.setup(inputs, Worker(cpus=1, gpu=False)), part))


def _load(stores: Stores, work: PartWork, inputs: Any, part: Part) -> tuple[int, Any]:
    storage.register_all(stores)
    # Two returns: the driver waits on the small first one (and sees a failure there) without
    # ever fetching the loaded part, which goes straight from this worker to an actor.
    return part.index, work.load_part(inputs, part)


class _PoolWorker:
    """One long-lived worker of a stateful stage: sets up once, then runs parts."""

    def __init__(self, stores: Stores, work: PartWork, inputs: Any, gpu: bool) -> None:
        storage.register_all(stores)
        self.work = work
        # A set-up that fails is reported by ready() as an ordinary task error carrying our own
        # exception; raised here it would reach the driver only as a traceback text.
        self.state: Any = None
        self.error: Exception | None = None
        try:
            self.state = work.setup(inputs, Worker(cpus=1 if gpu else node_cpus(), gpu=gpu))
        except Exception as error:
            self.error = error

    def ready(self) -> None:
        if self.error is not None:
            raise self.error

    def run_part(self, part: Any) -> PartResult:
        return _stamped(self.work.run_part(self.state, part))


# -- driver side ----------------------------------------------------------------------------------


class RayCompute:
    """The Compute a stage's driver-side steps get (curate.core.stage.Compute), over Ray."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self._pools: list[RayShardPool] = []

    def task(self, label: str, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        resources = whole_node()
        request = resource_request(**resources)
        check_schedulable(label, request)
        ref = ray.remote(**resources)(_call).remote(storage.registered(), work, *args, **kwargs)
        try:
            wait_one([ref], label, [request])
        except BaseException:
            ray.cancel(ref)  # a stop, or no node left for it: no task left behind (only
            raise  # unfinished ones: Ray 2.60 aborts the driver cancelling a finished one)
        try:
            return ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
            raise failure(f"{label} failed", error) from None

    def fan_out(self, work: Callable[..., Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        return fan_out(work, shared, items)

    def shard_pool(
        self,
        label: str,
        open: Callable[[Any, Worker], Any],
        shards: Sequence[Any],
        *,
        gpu: bool = False,
    ) -> RayShardPool:
        pool = start_shard_pool(label, open, shards, gpu)
        self._pools.append(pool)
        return pool

    def close_pools(self) -> None:
        """Stop the shard pools opened so far (run_stage: when their stage ends, however)."""
        while self._pools:
            self._pools.pop().close()

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
    shared_ref, stores = ray.put(shared), storage.registered()
    remote = ray.remote(_call)
    return ray.get([remote.remote(stores, work, shared_ref, *item) for item in items])


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
    requests = [resource_request(num_cpus=cpus)]
    check_schedulable(label, requests[0])
    # Ray re-runs a part whose worker died (OOM, lost node); an exception raised by our own code
    # is a bug or an unreadable source and stops the stage instead.
    remote = ray.remote(num_cpus=cpus, max_retries=3)(_run_stateless)
    place = round_the_nodes(cpus)
    # Two parts per slot keep every worker busy while the driver commits; the window bounds the
    # driver's memory whatever the number of parts.
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    shared = (storage.registered(), ray.put(work), ray.put(inputs))
    pending: dict[ray.ObjectRef, Part] = {}

    def fill() -> None:
        while len(pending) < window and (part := next(todo, None)) is not None:
            pending[remote.options(scheduling_strategy=place(part.index)).remote(*shared, part)] = (
                part
            )

    try:
        fill()
        while pending:
            ref = wait_one(list(pending), label, requests)
            part = pending.pop(ref)
            try:
                result: PartResult = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise failure(f"{label} failed on {work.describe(part)}", error) from None
            commit(result)
            bar.committed(result)
            fill()
    finally:
        for ref in pending:
            ray.cancel(ref)


# A worker lost with its node: its parts go to the others.
_WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)
# Times a stateful stage places a new pool after losing every worker, before it gives up.
_POOL_STARTS = 3


def _map_pool(
    work: PartWork,
    inputs: Any,
    todo: Iterator[Part],
    label: str,
    commit: Callable[[PartResult], None],
    bar: PartProgress,
) -> None:
    """A pool of stateful workers, fed by load tasks when the stage has a load step: one
    worker per GPU; on a CPU-only cluster one per node, given that node's cores.

    Workers are pinned to their node and never restarted elsewhere: a restarted worker would
    double up on a survivor and take the cores its load tasks need. A worker lost with its node
    is dropped and its parts (their loaded payloads, which Ray rebuilds if they died with the
    node) go to the others; a pool left with none is placed again on the nodes alive then."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if work.resources.gpus else 0
    shared = (storage.registered(), ray.put(work), ray.put(inputs))
    actor_class = ray.remote(max_restarts=0, max_task_retries=0)(_PoolWorker)
    load = ray.remote(num_cpus=1, max_retries=3, num_returns=2)(_load)
    place = round_the_nodes(1)
    load_request = resource_request(num_cpus=1)
    check_schedulable(label, load_request)

    actors: dict[int, Any] = {}
    queued: dict[int, int] = {}
    keys = itertools.count()
    starts = 0
    requests: list[dict[str, float]] = [load_request]

    def start_pool() -> None:
        nonlocal starts, requests
        while not actors:
            starts += 1
            if starts > _POOL_STARTS:
                raise StageFailed(
                    f"{label}: lost every worker {_POOL_STARTS} times (their nodes died); "
                    "re-run the job to resume where it stopped"
                )
            placements = pool_placements(work.resources.cpus, work.resources.gpus, gpus)
            requests = [resource_request(placements[0]["num_cpus"], placements[0]["num_gpus"])]
            requests.append(load_request)
            check_schedulable(label, requests[0])
            readiness = {}
            for placement in placements:
                key = next(keys)
                actors[key] = actor_class.options(**placement).remote(*shared, bool(gpus))
                queued[key] = 0
                readiness[actors[key].ready.remote()] = key
            wait_all(list(readiness), label, requests)
            for ref, key in readiness.items():
                try:
                    ray.get(ref)
                except _WORKER_LOST:
                    lose(key)  # its node went away while it started
                except ray.exceptions.RayTaskError as error:
                    raise failure(f"{label}: {work.describe_setup(inputs)}", error) from None

    def lose(key: int) -> None:
        if key in actors:
            with suppress(Exception):
                ray.kill(actors.pop(key))
            queued.pop(key)

    # Logical CPUs left for loading once each actor holds its own.
    load_slots = max(1, int(resources.get("CPU", 1)) - max(1, gpus))
    # Loaded-or-loading parts not yet at an actor: bounds memory to a few loaded parts.
    load_window = load_slots + max(1, gpus)
    loading: dict[ray.ObjectRef, tuple[Part, ray.ObjectRef]] = {}
    ready: deque[tuple[Part, Any]] = deque()
    running: dict[ray.ObjectRef, tuple[Part, int, Any]] = {}

    def fill() -> None:
        while len(loading) + len(ready) < load_window and (part := next(todo, None)) is not None:
            if work.loads_parts:
                placed = load.options(scheduling_strategy=place(part.index))
                index_ref, loaded_ref = placed.remote(*shared, part)
                loading[index_ref] = (part, loaded_ref)
            else:
                ready.append((part, part))
        while ready and actors and min(queued.values()) < _ACTOR_QUEUE:
            key = min(queued, key=queued.__getitem__)
            part, payload = ready.popleft()
            running[actors[key].run_part.remote(payload)] = (part, key, payload)
            queued[key] += 1

    try:
        fill()
        start_pool()
        fill()
        while loading or running:
            ref = wait_one([*loading, *running], label, requests)
            if ref in loading:
                part, loaded_ref = loading.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise failure(f"{label} failed on {work.describe(part)}", error) from None
                ready.append((part, loaded_ref))
            else:
                part, key, payload = running.pop(ref)
                try:
                    result: PartResult = ray.get(ref)
                except _WORKER_LOST:
                    lose(key)
                    ready.appendleft((part, payload))
                    start_pool()  # only when no worker is left
                except ray.exceptions.RayTaskError as error:
                    raise failure(f"{label} failed on {work.describe(part)}", error) from None
                else:
                    queued[key] -= 1
                    commit(result)
                    bar.committed(result)
            fill()
    finally:
        for ref in loading:
            ray.cancel(ref)
        for key in list(actors):
            # Frees the workers' (GPU) memory for the stages that follow.
            lose(key)


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
        finally:
            # A stage's shard pools (its searchers' memory, their GPUs) end with the stage.
            if isinstance(job.compute, RayCompute):
                job.compute.close_pools()
        catalog.finish_stage(job.job_id, name, "done", time.perf_counter() - started, metrics)
    stage.finished(job)
