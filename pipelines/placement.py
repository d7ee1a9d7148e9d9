"""Where a stage's work runs on the Ray cluster: the resources a whole-stage task asks for, the
nodes parts go round, the workers of a stateful pool and of a shard pool, and the check that
some live node can still run what is asked (Ray itself would wait for such a node for ever)."""

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from pipelines.failures import Unschedulable

# While waiting on work, how often the driver checks that some live node can still run it: a
# request no node can meet (its node died, or it never existed) is an error, never a hang.
_RECHECK_S = 20.0


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def whole_node() -> dict[str, float]:
    """Ray resources of a one-off whole-stage task: the cores of the largest node (never the
    cluster's sum, which no node has) and a GPU when that node has one.

    A 1-CPU Ray task gets one OpenMP thread, so FAISS and BLAS would run single-threaded."""
    nodes = alive_nodes()
    largest = max(
        nodes,
        key=lambda n: (n["Resources"].get("GPU", 0) >= 1, n["Resources"].get("CPU", 0)),
        default=None,
    )
    if largest is None:
        return {"num_cpus": 1, "num_gpus": 0}
    cpus = int(largest["Resources"].get("CPU", 0))
    gpu = largest["Resources"].get("GPU", 0) >= 1
    return {"num_cpus": max(1, cpus), "num_gpus": 1 if gpu else 0}


def resource_request(num_cpus: float = 0, num_gpus: float = 0) -> dict[str, float]:
    """Ray's resource names for a task's or actor's num_cpus and num_gpus."""
    return {"CPU": num_cpus, "GPU": num_gpus}


def check_schedulable(label: str, request: dict[str, float]) -> None:
    """Raise Unschedulable, naming the request and every live node's resources, when no live
    node could ever run it; Ray itself would wait for such a node for ever."""
    nodes = alive_nodes()
    wanted = {key: value for key, value in request.items() if value}
    for node in nodes:
        if all(node["Resources"].get(key, 0) >= value for key, value in wanted.items()):
            return
    have = "; ".join(
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}): "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(node["Resources"].items()) if k in request)
        for node in nodes
    )
    raise Unschedulable(
        f"{label}: no live node of the Ray cluster has "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(wanted.items()))
        + f" for one task; live nodes: {have or 'none'}. Add such a node, or lower the stage's "
        "resources (CURATE_NUM_CPUS / CURATE_NUM_GPUS for a local cluster); the job resumes "
        "where it stopped."
    )


def wait_one(refs: list, label: str, requests: Sequence[dict[str, float]]) -> Any:
    """The first of `refs` to finish; fails instead of waiting for ever when no live node can
    run one of `requests` any more."""
    while True:
        ready, _ = ray.wait(refs, num_returns=1, timeout=_RECHECK_S)
        if ready:
            return ready[0]
        for request in requests:
            check_schedulable(label, request)


def wait_all(refs: list, label: str, requests: Sequence[dict[str, float]]) -> None:
    left = list(refs)
    while left:
        left.remove(wait_one(left, label, requests))


def node_affinity(node_id: str):
    """Place on `node_id` only: a worker of a node that died is lost, not moved (`_map_pool`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def pool_placements(cpus: float, gpus_each: float, gpus: int) -> list[dict[str, Any]]:
    """Ray options of each worker of a stateful pool: one per GPU; on a CPU-only cluster one
    per node with a core to spare for load tasks, pinned there. A cluster of one-core nodes gets
    one worker that reserves no core, sharing its node's with the load tasks: reserving it would
    leave them none."""
    if gpus:
        return [{"num_cpus": cpus, "num_gpus": gpus_each} for _ in range(gpus)]
    nodes = alive_nodes()
    roomy = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpus + 1]
    if roomy:
        return [
            {"num_cpus": cpus, "num_gpus": 0, "scheduling_strategy": node_affinity(n["NodeID"])}
            for n in roomy
        ]
    largest = max(nodes, key=lambda n: n["Resources"].get("CPU", 0), default=None)
    strategy = {"scheduling_strategy": node_affinity(largest["NodeID"])} if largest else {}
    return [{"num_cpus": 0, "num_gpus": 0, **strategy}]


def round_the_nodes(cpus: float) -> Callable[[int], Any]:
    """The placement of part k: the k-th of the live nodes' slots, a node having one slot per
    task of `cpus` it runs at once, interleaved. Parts go round the nodes in proportion to their
    cores, the same way on every run, instead of wherever Ray's scheduler prefers at the moment
    (SPREAD left a stage's parts on one node of two now and then); soft, so the part of a node
    that died runs elsewhere."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    slots = _node_slots(cpus)
    if not slots:
        return lambda _: "DEFAULT"
    return lambda k: NodeAffinitySchedulingStrategy(node_id=slots[k % len(slots)], soft=True)


def _node_slots(cpus: float) -> list[str]:
    """The live nodes' ids, each once per task of `cpus` it runs at once, interleaved."""
    nodes = [n for n in alive_nodes() if n["Resources"].get("CPU", 0) >= max(cpus, 1e-9)]
    per_node = {n["NodeID"]: max(1, int(n["Resources"]["CPU"] // max(cpus, 1))) for n in nodes}
    return [
        node
        for rank in range(max(per_node.values(), default=0))
        for node, count in per_node.items()
        if rank < count
    ]


@dataclass(frozen=True)
class ShardPlacement:
    """Where one actor of a shard pool runs: its Ray options, and the FAISS threads it uses."""

    options: dict[str, Any]
    threads: int
    gpu: bool


def shard_placements(count: int, gpu: bool) -> list[ShardPlacement]:
    """The actors of a pool of `count` shards (pipelines/shard_pool.py).

    With `gpu` on a cluster with GPUs: an equal share of a GPU each (a whole one when there are
    enough), no CPU held. Otherwise round the nodes in proportion to their cores, as parts go,
    softly pinned (a lost actor starts again elsewhere), holding no CPU (Ray's default for an
    actor that names no resources: it needs a node with a CPU to start on, and holds none
    while it runs), each with FAISS threads for its share of its node's cores."""
    gpus = int(ray.cluster_resources().get("GPU", 0)) if gpu else 0
    if gpus:
        share = 1 / math.ceil(count / gpus)
        return [ShardPlacement({"num_cpus": 0, "num_gpus": share}, 1, True)] * count
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    slots = _node_slots(1)
    if not slots:
        return [ShardPlacement({}, 1, False)] * count
    nodes = [slots[k % len(slots)] for k in range(count)]
    cores = {n["NodeID"]: int(n["Resources"].get("CPU", 1)) for n in alive_nodes()}
    on_node = Counter(nodes)
    return [
        ShardPlacement(
            {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)},
            max(1, cores.get(node, 1) // on_node[node]),
            False,
        )
        for node in nodes
    ]


def node_cpus() -> int:
    """The CPUs this worker's node gives Ray, bounded by the cores the process may run on."""
    node_id = ray.get_runtime_context().get_node_id()
    cores = len(os.sched_getaffinity(0))
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, min(cores, int(node["Resources"].get("CPU", cores))))
    return cores


# -- worker side ----------------------------------------------------------------------------------
