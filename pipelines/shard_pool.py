"""Shard pools on Ray (curate.core.stage.ShardPool): one long-lived actor per shard of a structure
too big for one process, opened once and called by the parts of a stage from their own tasks.

Unlike a stateful stage's workers (executor._map_pool), a shard's actor holds no CPU while it
runs: its callers are the stage's part tasks, which wait on it (and give their CPU back to Ray
while they wait), so a searcher that reserved cores would only keep those tasks from being
scheduled. It gets FAISS threads for its share of its node's cores instead. Holding nothing, it
can also be started again on any node: a shard's actor lost with its node is re-opened elsewhere
by Ray (it reloads its shard from the data root) and the calls it had are retried there.
"""

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import ray

from curate.core import storage
from curate.core.stage import Worker
from pipelines.failures import failure
from pipelines.placement import check_schedulable, resource_request, shard_placements, wait_all

# Times Ray re-opens a lost shard's actor, and re-sends a call it lost, before the caller fails.
_RESTARTS = 3


class _ShardWorker:
    """One shard's actor: `open(shard, worker)` once, then calls on what it returned."""

    def __init__(
        self,
        stores: tuple[storage.Store, ...],
        open: Callable[[Any, Worker], Any],
        shard: Any,
        worker: Worker,
    ) -> None:
        storage.register_all(stores)  # the driver's object store roots: its shard is there
        # A failed open is raised by ready() as an ordinary task error carrying our exception;
        # raised here it would reach the driver only as a traceback text.
        self.state: Any = None
        self.error: Exception | None = None
        try:
            self.state = open(shard, worker)
        except Exception as error:
            self.error = error

    def ready(self) -> None:
        if self.error is not None:
            raise self.error

    def call(self, method: str, args: tuple) -> Any:
        return getattr(self.state, method)(*args)


class RayShardPool:
    """The actors of a shard pool, in shard order; pickles into tasks (Ray actor handles)."""

    def __init__(self, label: str, actors: list) -> None:
        self.label = label
        self.actors = actors

    def map(self, method: str, *args: Any) -> list[Any]:
        shared = ray.put(args)  # sent once, whatever the number of shards
        return ray.get([actor.call.remote(method, shared) for actor in self.actors])

    def close(self) -> None:
        """Stop the actors (frees their memory, and their GPUs for the stages that follow)."""
        for actor in self.actors:
            with suppress(Exception):
                ray.kill(actor)
        self.actors = []


def start_shard_pool(
    label: str, open: Callable[[Any, Worker], Any], shards: Sequence[Any], gpu: bool
) -> RayShardPool:
    """One actor per shard, placed by `placement.shard_placements`; returns once all are open."""
    actor_class = ray.remote(max_restarts=_RESTARTS, max_task_retries=_RESTARTS)(_ShardWorker)
    placements = shard_placements(len(shards), gpu)
    # A GPU share, or a node with a CPU to start on (held by none of them once started).
    share = placements[0].options.get("num_gpus", 0) if placements else 0
    requests = [resource_request(num_gpus=share) if share else resource_request(num_cpus=1)]
    check_schedulable(label, requests[0])
    pool = RayShardPool(label, [])
    stores = storage.registered()
    try:
        for shard, placement in zip(shards, placements, strict=True):
            worker = Worker(cpus=placement.threads, gpu=placement.gpu)
            actor = actor_class.options(**placement.options).remote(stores, open, shard, worker)
            pool.actors.append(actor)
        readiness = [actor.ready.remote() for actor in pool.actors]
        wait_all(readiness, label, requests)
        for number, ref in enumerate(readiness):
            try:
                ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                raise failure(f"{label}: opening shard {number} of {len(shards)}", error) from None
    except BaseException:
        pool.close()
        raise
    return pool
