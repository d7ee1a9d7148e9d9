"""Evaluation sets: ingested and described once per copy model, cached under the data root."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from curate.catalog import Catalog
from curate.core.shards import ShardRef
from curate.settings import Settings
from curate.stages.dedup.decide import EvalSet
from curate.stages.dedup.features import CopyModelSpec, dedup_features_part, list_matrix
from curate.stages.ingest.part import ingest_part
from curate.stages.ingest.sources import detect_source
from schemas.errors import InputError
from schemas.job import DedupOptions, IngestOptions

_COMPLETE = "complete.json"


class EvalSetError(InputError, ValueError):
    """An evaluation set that cannot be used: unknown, unreadable, or no model to describe it."""

    code = "eval_set_invalid"


def _cache_dir(settings: Settings, name: str, copy_model: CopyModelSpec) -> Path:
    return settings.data_root / "eval_sets" / name / copy_model.fingerprint()


def _describe(location: str, copy_model: CopyModelSpec, settings: Settings, cache: Path) -> None:
    """Ingest the set with default options and compute its copy descriptors, on Ray."""
    source = detect_source(location)
    ingest = ray.remote(ingest_part)
    options = IngestOptions()
    results = ray.get(
        [
            ingest.remote(part, options, settings.crawl_settings(), cache / "ingest")
            for part in source.parts(options.shard_size)
        ]
    )
    describe = ray.remote(dedup_features_part)
    shards = [ShardRef(r.part, r.shards["data"].path) for r in results]
    described = ray.get(
        [describe.remote(s, DedupOptions(), copy_model, cache / "features") for s in shards]
    )
    manifest = {"location": location, "features": [str(r.shards["data"].path) for r in described]}
    # Written whole or not at all: a torn manifest would fail every later run.
    tmp = cache / f".{_COMPLETE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(cache / _COMPLETE)


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
    names: list[str], catalog: Catalog, settings: Settings, copy_model: CopyModelSpec
) -> list[EvalSet]:
    """The named evaluation sets with their descriptors, computing them on first use."""
    registered = check_eval_sets(names, catalog, copy_model)
    sets = []
    for name in names:
        cache = _cache_dir(settings, name, copy_model)
        if not (cache / _COMPLETE).exists():
            _describe(registered[name], copy_model, settings, cache)
        files = json.loads((cache / _COMPLETE).read_text())["features"]
        table = pq.read_table(files, columns=["image_id", "copy_descriptor"]) if files else None
        if table is None or table.num_rows == 0:
            raise EvalSetError(f"eval set {name!r} at {registered[name]} holds no usable images")
        descriptors = list_matrix(table.column("copy_descriptor"), np.float16)
        sets.append(EvalSet(name, table.column("image_id").to_pylist(), descriptors))
    return sets
