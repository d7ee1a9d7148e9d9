"""The embed stage: every kept image through the embedding model, one ingest part per part.

The model is loaded once per worker, not once per part, so the stage is stateful: the executor
runs it in a pool of long-lived workers (one per GPU; on a CPU-only cluster one, given its
node's cores as torch threads), and decodes parts to uint8 crops in ordinary one-CPU tasks
beside it (`load_part`). A part's shard is written by the worker that embedded it.

CPU placement (measured in bench/embed.py): the worker reserves one logical CPU so decode tasks
can run, but sets torch's intra-op threads to every core of its node. Decoding a 224 px crop
(JPEG draft mode) costs a few milliseconds against tens to hundreds for a ViT forward on CPU, so
the decode task borrows little from the model's threads, and one decode slot keeps the model fed.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.core.shards import PartResult
from curate.core.stage import JobRun, Plan, Resources, Stage, Worker
from curate.settings import Settings
from curate.stages.embed.embedder import (
    DecodedPart,
    Embedder,
    EmbedInput,
    decode_part,
    write_embed_part,
)
from curate.stages.embed.model import ModelSpec, check_spec
from schemas.job import JobSpec, StageName


def embed_model_of(settings: Settings, spec: JobSpec) -> ModelSpec:
    """The job's embedding model: its architecture and size from the spec, weights from the
    machine's settings."""
    options = spec.embed
    allow_random = settings.allow_random_weights or options.random_weights
    return ModelSpec(options.arch, settings.embed_weights, allow_random, options.image_size)


@dataclass(frozen=True)
class EmbedInputs:
    """What every embed worker gets."""

    model: ModelSpec
    out_dir: Path
    batch_size: int
    compile: bool = False
    # torch threads of a CPU worker (default: every core of its node); GPU workers keep torch's.
    threads: int | None = None


class EmbedStage(Stage):
    name = StageName.EMBED
    reads = (StageName.INGEST, StageName.DEDUP)
    resources = Resources(cpus=1, gpus=1, stateful=True)
    loads_parts = True

    def check(self, job: JobRun) -> None:
        check_spec(embed_model_of(job.settings, job.spec))

    def plan(self, job: JobRun) -> Plan:
        decisions = {s.index: s.path for s in job.shards(StageName.DEDUP)}
        parts = [
            EmbedInput(s.index, s.path, decisions[s.index]) for s in job.shards(StageName.INGEST)
        ]
        options = job.spec.embed
        model = embed_model_of(job.settings, job.spec)
        return Plan(
            parts=parts,
            total=len(parts),
            inputs=EmbedInputs(
                model, job.stage_dir(self.name), options.batch_size, options.compile
            ),
            metrics={"model": model.fingerprint(), "random_weights": model.weights is None},
        )

    def setup(self, inputs: EmbedInputs, worker: Worker) -> tuple[Embedder, EmbedInputs]:
        threads = None if worker.gpu else inputs.threads or worker.cpus
        embedder = Embedder(
            inputs.model, batch_size=inputs.batch_size, compile=inputs.compile, num_threads=threads
        )
        return embedder, inputs

    def load_part(self, inputs: EmbedInputs, part: EmbedInput) -> DecodedPart:
        return decode_part(part, inputs.model.img_size)

    def run_part(self, state: tuple[Embedder, EmbedInputs], part: DecodedPart) -> PartResult:
        embedder, inputs = state
        started = time.perf_counter()
        pixels = part.pixels
        if not pixels.flags.writeable:
            # Ray hands over a read-only view of shared memory; torch wants to own writable data.
            pixels = np.array(pixels)
        result = write_embed_part(part, embedder(pixels), inputs.out_dir)
        result.seconds = part.seconds + (time.perf_counter() - started)
        return result

    def describe(self, part: EmbedInput) -> str:
        return f"part {part.index} ({part.ingest})"

    def describe_setup(self, inputs: EmbedInputs) -> str:
        return f"loading model {inputs.model.arch}"

    def summarize(self, job: JobRun, plan: Plan) -> dict[str, Any]:
        return plan.metrics


STAGE = EmbedStage()
