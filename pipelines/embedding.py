"""Embed stage on Ray: decode parts in CPU tasks, embed them in a pool of model actors.

The model is loaded once per actor, not once per part, so the model runs in long-lived actors
(one per GPU; on a CPU-only cluster one, given the node's cores as torch threads) and parts are
decoded to uint8 crops in ordinary one-CPU tasks beside it. A part's shard is written by the actor
that embedded it; the driver only sees each part's small PartResult and commits it.

CPU placement (measured in bench/embed.py): the actor reserves one logical CPU so decode tasks
can run, but sets torch's intra-op threads to every core of its node. Decoding a 224 px crop
(JPEG draft mode) costs a few milliseconds against tens to hundreds for a ViT forward on CPU, so
the decode task borrows little from the model's threads, and one decode slot keeps the actor fed.
"""

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import ray

from curate.core.shards import PartResult
from curate.stages.embed.embedder import (
    DecodedPart,
    Embedder,
    EmbedInput,
    decode_part,
    write_embed_part,
)
from curate.stages.embed.model import ModelSpec, check_spec
from pipelines.runner import PartProgress, StageFailed

# Parts queued per model actor: the next part's pixels are already local when one finishes.
_ACTOR_QUEUE = 2


def _decode(part: EmbedInput, image_size: int) -> tuple[int, DecodedPart]:
    # Two returns: the driver waits on the small count (and sees a failure there) without ever
    # fetching the pixels, which go straight from the decode worker to the actor.
    decoded = decode_part(part, image_size)
    return len(decoded.image_ids), decoded


def _node_cpus() -> int:
    """The CPUs this worker's node gives Ray, bounded by the cores the process may run on."""
    node_id = ray.get_runtime_context().get_node_id()
    cores = len(os.sched_getaffinity(0))
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, min(cores, int(node["Resources"].get("CPU", cores))))
    return cores


class EmbedActor:
    """One model replica: embeds decoded parts and writes their shards."""

    def __init__(
        self, spec: ModelSpec, batch_size: int, compile: bool, threads: int | None, on_cpu: bool
    ):
        if on_cpu and threads is None:
            threads = _node_cpus()
        # A model that fails to load is reported by ready() as an ordinary task error carrying
        # the WeightsError itself; raised here it would reach the driver only as a traceback text.
        self.embedder: Embedder | None = None
        self.load_error: Exception | None = None
        try:
            self.embedder = Embedder(
                spec, batch_size=batch_size, compile=compile, num_threads=threads
            )
        except Exception as error:
            self.load_error = error

    def ready(self) -> str:
        if self.embedder is None:
            assert self.load_error is not None
            raise self.load_error
        return str(self.embedder.device)

    def embed_part(self, decoded: DecodedPart, out_dir: Path) -> PartResult:
        started = time.perf_counter()
        pixels = decoded.pixels
        if not pixels.flags.writeable:
            # Ray hands over a read-only view of shared memory; torch wants to own writable data.
            pixels = np.array(pixels)
        assert self.embedder is not None, "embed_part called on an actor whose model failed"
        result = write_embed_part(decoded, self.embedder(pixels), out_dir)
        result.seconds = decoded.seconds + (time.perf_counter() - started)
        return result


def _describe(part: EmbedInput) -> str:
    return f"part {part.index} ({part.ingest})"


def _failure(stage: str, part: EmbedInput | None, error: Exception) -> StageFailed:
    cause: BaseException = error
    # A task error carries our exception; an actor that died in __init__ carries its task error.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    where = f" on {_describe(part)}" if part is not None else ""
    return StageFailed(f"{stage} failed{where}: {type(cause).__name__}: {cause}")


def embed_parts(
    inputs: Iterable[EmbedInput],
    spec: ModelSpec,
    *,
    out_dir: Path,
    image_size: int,
    batch_size: int,
    compile: bool,
    done: set[int],
    commit: Callable[[PartResult], None],
    parts_total: int | None,
    progress: bool,
    stage: str = "embed",
    threads: int | None = None,
) -> None:
    """Decode parts in CPU tasks, embed them in a pool of model actors (one per GPU; on CPU-only
    clusters one actor with the node's cores), write each part's shard, and call commit(result)
    in the driver for every finished part, skipping `done`. A failed part raises StageFailed.

    threads: torch threads of a CPU actor (default: every core of its node); GPU actors keep
    torch's default.
    """
    if image_size != spec.img_size:
        raise ValueError(
            f"image_size {image_size} differs from the model's img_size {spec.img_size}"
        )
    check_spec(spec)
    todo = (part for part in inputs if part.index not in done)
    first = next(todo, None)
    if first is None:
        return  # everything committed: no model to load
    todo = itertools.chain([first], todo)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors_n = max(1, gpus)
    # Logical CPUs left for decoding once each actor holds one.
    decode_slots = max(1, int(resources.get("CPU", 1)) - actors_n)
    # Decoded-or-decoding parts not yet at an actor: bounds memory to a few parts of pixels.
    decode_window = decode_slots + actors_n
    actor_class = ray.remote(
        num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=1, max_task_retries=1
    )(EmbedActor)
    actors = [
        actor_class.remote(spec, batch_size, compile, None if gpus else threads, not gpus)
        for _ in range(actors_n)
    ]
    decode = ray.remote(num_cpus=1, max_retries=3)(_decode).options(num_returns=2)

    decoding: dict[ray.ObjectRef, tuple[EmbedInput, ray.ObjectRef]] = {}
    ready: deque[tuple[EmbedInput, ray.ObjectRef]] = deque()
    embedding: dict[ray.ObjectRef, tuple[EmbedInput, int]] = {}
    load = [0] * actors_n
    bar = PartProgress(stage, parts_total, len(done), progress)

    def fill() -> None:
        while len(decoding) + len(ready) < decode_window and (part := next(todo, None)) is not None:
            count_ref, decoded_ref = decode.remote(part, image_size)
            decoding[count_ref] = (part, decoded_ref)
        while ready and min(load) < _ACTOR_QUEUE:
            actor = load.index(min(load))
            part, decoded_ref = ready.popleft()
            embedding[actors[actor].embed_part.remote(decoded_ref, out_dir)] = (part, actor)
            load[actor] += 1

    try:
        fill()
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            raise _failure(f"{stage}: loading model {spec.arch}", None, error) from None
        while decoding or embedding:
            (ref,), _ = ray.wait([*decoding, *embedding], num_returns=1)
            if ref in decoding:
                part, decoded_ref = decoding.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise _failure(stage, part, error) from None
                ready.append((part, decoded_ref))
            else:
                part, actor = embedding.pop(ref)
                load[actor] -= 1
                try:
                    result: PartResult = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                    raise _failure(stage, part, error) from None
                commit(result)
                bar.committed(result)
            fill()
    finally:
        for ref in decoding:
            ray.cancel(ref)
        for actor in actors:
            # Frees the model's (GPU) memory for the stages that follow.
            ray.kill(actor)
        bar.close()
