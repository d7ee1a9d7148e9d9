"""The stages in pipeline order. Adding a stage is one package under curate/stages/ exporting its
stage object, its name in schemas.job.StageName, and one line here.

The table names where each stage object lives rather than importing it: a stage's module brings
its libraries (dedup and embed bring torch, timm and faiss, seconds of start-up), and a job
imports only the stages it runs, so a run that stops at ingest never loads them.
"""

import importlib
from typing import NamedTuple

from curate.core.stage import Stage
from schemas.job import JobSpec, StageName


class Entry(NamedTuple):
    name: StageName
    section: str  # the JobSpec section it belongs to (Stage.job_section)
    module: str
    attribute: str


# tests/unit/pipelines/test_registry.py loads every entry and checks it against its object.
ENTRIES: tuple[Entry, ...] = (
    Entry(StageName.INGEST, "ingest", "curate.stages.ingest.stage", "STAGE"),
    Entry(StageName.DEDUP_FEATURES, "dedup", "curate.stages.dedup.stage", "FEATURES_STAGE"),
    Entry(StageName.DEDUP, "dedup", "curate.stages.dedup.stage", "STAGE"),
    Entry(StageName.EMBED, "embed", "curate.stages.embed.stage", "STAGE"),
    Entry(StageName.CLUSTER, "cluster", "curate.stages.cluster.stage", "STAGE"),
    Entry(StageName.RETRIEVE, "retrieve", "curate.stages.retrieve.stage", "STAGE"),
    Entry(StageName.CURATED, "curated", "curate.stages.curated.stage", "STAGE"),
)

# Every name has its entry, in the same order: the registry and the names cannot drift apart.
assert [e.name for e in ENTRIES] == list(StageName), "pipelines/registry.py is out of order"


def load_stage(name: str) -> Stage:
    """The stage object named `name`, importing its module (once: Python caches it)."""
    entry = next((e for e in ENTRIES if e.name == name), None)
    if entry is None:
        raise KeyError(f"no stage named {name!r}")
    return getattr(importlib.import_module(entry.module), entry.attribute)


def all_stages() -> tuple[Stage, ...]:
    """Every stage object in pipeline order; imports every stage's libraries."""
    return tuple(load_stage(e.name) for e in ENTRIES)


def job_stages(spec: JobSpec) -> list[Stage]:
    """The stages a job runs, in order: those of the spec's sections up to its last stage. Only
    their modules are imported."""
    wanted = set(spec.stages())
    return [load_stage(e.name) for e in ENTRIES if e.section in wanted]
