"""Evaluation sets: ingested and described once per copy model, cached under the data root.

Copies of evaluation images are removed from the crawl (DINOv2's decontamination); the sets are
registered by name (`curate eval-sets add`) and shared by every job that names them.
"""

from pathlib import Path

import numpy as np

from curate.catalog import Catalog
from curate.core import atomic, storage
from curate.core.shards import PartResult, ShardRef
from curate.core.stage import JobRun, PartWork
from curate.settings import Settings
from curate.stages.dedup.decide import EvalSet
from curate.stages.dedup.features import CopyModelSpec, list_matrix
from curate.stages.ingest.sources import detect_source
from curate.stages.ingest.stage import STAGE as INGEST
from schemas.errors import InputError
from schemas.job import DedupOptions, IngestOptions

_COMPLETE = "complete.json"


class EvalSetError(InputError, ValueError):
    """An evaluation set that cannot be used: unknown, unreadable, or no model to describe it."""

    code = "eval_set_invalid"


def _part(result: PartResult) -> int:
    return result.part


def _cache_dir(settings: Settings, name: str, copy_model: CopyModelSpec) -> Path:
    return settings.root / "eval_sets" / name / copy_model.fingerprint()


def _describe(
    name: str, location: str, copy_model: CopyModelSpec, job: JobRun, features: PartWork
) -> None:
    """Ingest the set with default options and compute its copy descriptors, on the cluster."""
    cache = _cache_dir(job.settings, name, copy_model)
    source = detect_source(location)
    options = IngestOptions()
    ingested: list[PartResult] = []
    job.compute.map_parts(
        INGEST,
        (options, job.settings.crawl_settings(), cache / "ingest"),
        source.parts(options.shard_size),
        label=f"eval set {name}: ingest",
        commit=ingested.append,
        total=source.parts_total(options.shard_size),
    )
    described: list[PartResult] = []
    shards = [ShardRef(r.part, r.shards["data"].path) for r in sorted(ingested, key=_part)]
    job.compute.map_parts(
        features,
        (DedupOptions(), copy_model, cache / "features"),
        shards,
        label=f"eval set {name}: describe",
        commit=described.append,
        total=len(shards),
    )
    root = job.settings.root
    features = [storage.portable(r.shards["data"].path, root) for r in sorted(described, key=_part)]
    # Written whole or not at all: a torn manifest would fail every later run.
    atomic.write_json(cache / _COMPLETE, {"location": location, "features": features})


def check_eval_sets(names: list[str], catalog: Catalog, copy_model: CopyModelSpec) -> dict:
    """The named sets' locations; raises before any work when one cannot be used."""
    registered = catalog.eval_sets()
    for name in names:
        if name not in registered:
            raise EvalSetError(
                f"unknown eval set {name!r}; register it with: curate eval-sets add {name} LOCATION"
            )
        if not copy_model.enabled:
            raise EvalSetError(
                f"eval set {name!r} needs copy descriptors: set CURATE_COPY_WEIGHTS to a local "
                "SSCD checkpoint"
            )
    return {name: registered[name] for name in names}


def load_eval_sets(
    names: list[str], job: JobRun, copy_model: CopyModelSpec, features: PartWork
) -> list[EvalSet]:
    """The named evaluation sets with their descriptors, computing them on first use with
    `features` (the dedup features pass)."""
    registered = check_eval_sets(names, job.catalog, copy_model)
    sets = []
    for name in names:
        cache = _cache_dir(job.settings, name, copy_model)
        if not storage.exists(cache / _COMPLETE):
            _describe(name, registered[name], copy_model, job, features)
        recorded = storage.read_json(cache / _COMPLETE)["features"]
        files = [storage.resolve(path, job.settings.root) for path in recorded]
        table = storage.read_table(files, ["image_id", "copy_descriptor"]) if files else None
        if table is None or table.num_rows == 0:
            raise EvalSetError(f"eval set {name!r} at {registered[name]} holds no usable images")
        descriptors = list_matrix(table.column("copy_descriptor"), np.float16)
        sets.append(EvalSet(name, table.column("image_id").to_pylist(), descriptors))
    return sets
