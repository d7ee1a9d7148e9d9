"""The per-job browse index: Parquet tables sorted for the lookups the results and image endpoints
make, built once from the job's registered shards.

- Locations, one small index per ingest shard (the job's parts and its seed sets' pinned
  shards) under job_dir/browse/locations/: image_id -> the row holding its bytes. Named by the
  shard's checksum, each is built once, so a running job's new parts add indexes and invalidate
  none.
- Results, in job_dir/browse/results-<fingerprint>/, the fingerprint covering the inputs (the
  registered shards' paths and checksums of the stages recorded done, the centroids file, the
  pinned seed sets): a change of input is a new name, so an index is never stale, only
  superseded. Only stages recorded done count, so a running stage's commits invalidate nothing:
  `clusters.parquet` (size, seed images per seed set, retrieved images per method, the 8 crawl
  images nearest the centroid, sort positions), `members.parquet` (every crawl image and every
  seed image placed in a cluster, by distance), `images.parquet` (per image: cluster, seed
  sets, the retrieve rows that picked it, its dedup decision), `neighbours.parquet` (retrieve
  rows by seed image), `groups.parquet` (dedup groups, representative first) and `map.json`
  (2-D PCA of the centroids).

Index files use row groups of ROW_GROUP rows: a look-up or a page decodes only the row groups it
touches (tables.py).
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.browse import seeds
from curate.core import storage
from curate.core.atomic import atomic_path
from curate.stages.cluster.centroids import CENTROIDS
from schemas.job import StageName

BROWSE_DIR = "browse"
ROW_GROUP = 1024
# Part of every index's name: a layout change makes new names, so an index written by an older
# version is never read as a newer one.
LAYOUT = 5
RESULT_STAGES = (StageName.DEDUP, StageName.CLUSTER, StageName.RETRIEVE)


@dataclass(frozen=True)
class JobInputs:
    """What the catalog says about a job (Catalog.browse_inputs) plus where its folder is."""

    job_id: str
    job_dir: Path
    data_root: Path
    spec: dict[str, Any]
    status: str
    stages: dict[str, str]  # stage -> status
    shards: dict[str, list[tuple[int, Path, str]]]  # stage -> (part, path, checksum) data shards

    def done(self, stage: str) -> bool:
        return self.stages.get(stage) == "done"

    @property
    def pin(self) -> dict[str, Any] | None:
        return seeds.pinned(self.job_dir, StageName.RETRIEVE.value)


def _digest(*values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:20]


def results_key(inputs: JobInputs) -> str | None:
    """The results index's name, or None when none of dedup, cluster, retrieve is done."""
    done = [stage for stage in RESULT_STAGES if inputs.done(stage)]
    if not done:
        return None
    centroids = inputs.job_dir / StageName.CLUSTER / CENTROIDS
    return "results-" + _digest(
        LAYOUT,
        {stage: inputs.shards.get(stage, []) for stage in done},
        storage.version(centroids),
        inputs.pin,
    )


def publish_index(parent: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build an index folder under a temporary name and rename it into place: it appears whole
    or not at all. Older versions of the same kind go, but the one before (a request may still
    be reading it)."""
    target = parent / name
    if target.exists():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.mkdir()
        build(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # another process published the same index first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kind = name.split("-", 1)[0]
    versions = sorted(parent.glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in versions[2:]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def connect() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for building an index."""
    return duckdb.connect(config={"threads": 2, "preserve_insertion_order": True})


def copy_to_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    """Write a query's rows as an index file, in row groups of ROW_GROUP rows, streamed.

    Through pyarrow, not DuckDB's COPY: COPY makes row groups of at least 2,048 rows and merges
    small ones (a 100k-row table came out as 6 row groups), and a lookup reads a whole group.
    """
    reader = con.sql(query).to_arrow_reader(ROW_GROUP * 16)
    with pq.ParquetWriter(path, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch, row_group_size=ROW_GROUP)


# -- locations --------------------------------------------------------------------------------


def location_sources(inputs: JobInputs) -> list[tuple[str, Path, Path]]:
    """(source, ingest shard, its location index) for every ingest shard that holds the job's
    images: the crawl's parts in order, then each seed set's pinned shards. An index is named by
    its shard's checksum (crawl) or size and time (seed sets), so it is built once per shard and
    a running job's new parts only add indexes."""
    folder = inputs.job_dir / BROWSE_DIR / "locations"
    sources = [
        ("crawl", path.absolute(), folder / f"crawl-{part:06d}-{_digest(LAYOUT, checksum)}.parquet")
        for part, path, checksum in inputs.shards.get(StageName.INGEST, [])
    ]
    for name, paths in sorted(seeds.seed_ingest_shards(inputs.pin, inputs.data_root).items()):
        for path in paths:
            if (stored := storage.version(path)) is not None:
                key = _digest(LAYOUT, str(path.absolute()), *stored)
                sources.append((name, path.absolute(), folder / f"seed-{name}-{key}.parquet"))
    return sources


def shard_locations(shard: Path, index: Path) -> Path:
    """The location index of one ingest shard, built once: image_id -> the row of its first
    occurrence in the shard (repeats within a part store null bytes), its format and uri."""
    if index.exists():
        return index
    # The small columns only, read in place: the image bytes stay in the shard (or the store).
    rows = storage.read_table(shard, ["image_id", "item", "format", "uri"])
    rows = rows.append_column("row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    with atomic_path(index) as tmp, connect() as con:
        con.register("shard", rows)
        copy_to_parquet(
            con,
            "SELECT image_id, row, format, uri FROM shard "
            "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY item) = 1 "
            "ORDER BY image_id",
            tmp,
        )
    return index
