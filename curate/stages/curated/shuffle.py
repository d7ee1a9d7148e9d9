"""Steps 2 and 3 of the curated stage: the selection's images shuffled into curated shards.

2. scatter (one task per source ingest shard): the selected images' bytes, written as one Arrow
   IPC file holding one record batch per bucket.
3. gather (one task per bucket): the bucket's batch from every source that feeds it, sorted by
   shuffle key, written as the curated shard `part-<bucket>.parquet`, which
   `datasets.load_dataset("parquet", ...)` loads as images.

Both are bounded in memory whatever the size of the crawl. Their intermediate files live under
`work_dir` (see `curate.stages.curated.layout`).
"""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core import storage
from curate.core.atomic import atomic_path
from curate.core.shards import PartResult, shard_name, write_shard
from curate.stages.curated.layout import bucket_sources_path, rows_dir, scatter_path
from curate.stages.curated.select import Bucket, SourceShard
from schemas.shards import CURATED, IMAGE_STRUCT

# Rows per record batch and per take: small enough that one batch's image bytes stay far under
# 2 GiB even for 32 MiB images.
_BATCH_ROWS = 64
# Columns the scatter step carries from the selection into the intermediate files.
_PROVENANCE = ["image_id", "seed_set", "seed_id", "similarity", "method", "cluster_id", "matches"]


# -- 2. scatter -----------------------------------------------------------------------------------


def _read_selected_rows(work_dir: Path, source: int) -> pa.Table:
    files = storage.listing(rows_dir(work_dir, source), "*.parquet")
    if not files:
        raise FileNotFoundError(f"no selection rows for source {source} in {work_dir}")
    return pa.concat_tables(storage.read_table(f) for f in files)


def _ingest_images(ingest: Path, wanted: set[str]) -> pa.Table:
    """The first row with bytes of every wanted image in an ingest shard, streamed by batch."""
    found: list[pa.RecordBatch] = []
    seen: set[str] = set()
    wanted_array = pa.array(sorted(wanted), pa.string())
    shard = storage.parquet_file(ingest)
    for batch in shard.iter_batches(
        batch_size=256, columns=["image_id", "uri", "image", "width", "height"]
    ):
        # An exact repeat inside a shard keeps its row without bytes: skip it, take the first.
        has_bytes = pc.is_valid(pc.struct_field(batch.column("image"), "bytes"))
        mask = pc.and_(pc.is_in(batch.column("image_id"), value_set=wanted_array), has_bytes)
        hits = batch.filter(mask)
        if hits.num_rows == 0:
            continue
        keep = []
        for i, image_id in enumerate(hits.column("image_id").to_pylist()):
            if image_id not in seen:
                seen.add(image_id)
                keep.append(i)
        if keep:
            found.append(hits.take(pa.array(keep, pa.int32())))
        if len(seen) == len(wanted):
            break
    if len(seen) != len(wanted):
        missing = sorted(wanted - seen)
        raise LookupError(
            f"{len(missing)} selected images have no bytes in ingest shard {ingest}: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    return pa.Table.from_batches(found) if found else pa.table({})


def scatter_source(
    source: SourceShard, work_dir: Path, skip_buckets: frozenset[int] = frozenset()
) -> PartResult:
    """Read one source shard's selected images and write them split by bucket.

    The output is one Arrow IPC file per source with one record batch per bucket, in bucket
    order (its schema metadata lists them): the gather step reads exactly its own batch.
    Buckets in `skip_buckets` (already committed) are left out.
    """
    started = time.perf_counter()
    if source.ingest is None:
        raise ValueError(f"source {source.index} (part {source.part}) has no ingest shard path")
    rows = _read_selected_rows(work_dir, source.index)
    if skip_buckets:
        skip = pa.array(sorted(skip_buckets), pa.int32())
        rows = rows.filter(pc.invert(pc.is_in(rows["bucket"], value_set=skip)))
    rows = rows.sort_by([("bucket", "ascending"), ("shuffle_key", "ascending")])
    ids = rows["image_id"].to_pylist()
    images = _ingest_images(source.ingest, set(ids)) if ids else None
    if images is not None and images.num_rows:
        position = {image_id: i for i, image_id in enumerate(images["image_id"].to_pylist())}
        order = pa.array([position[i] for i in ids], pa.int64())
        images = take_rows(images, order)
        table = pa.table(
            {
                "image": images["image"],
                **{name: rows[name] for name in _PROVENANCE},
                "uri": images["uri"],
                "width": images["width"],
                "height": images["height"],
                "bucket": rows["bucket"],
                "shuffle_key": rows["shuffle_key"],
            }
        )
    else:
        table = pa.table({"bucket": pa.array([], pa.int32())})
    _write_batches_by_bucket(table, scatter_path(work_dir, source.index))
    return PartResult(
        part=source.index,
        rows_in=source.rows,
        rows_out=table.num_rows,
        shards={},
        seconds=time.perf_counter() - started,
    )


def _write_batches_by_bucket(table: pa.Table, path: Path) -> None:
    """One Arrow IPC file whose schema metadata maps each bucket to its run of record batches.

    Batches stay small (_BATCH_ROWS) and chunks are never combined: a bucket's image bytes can
    pass the 2 GiB a 32-bit-offset binary array holds.
    """
    # Rows are sorted by bucket: each bucket's rows are one contiguous slice.
    buckets = table["bucket"].to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist(), table.num_rows]
    batches: list[pa.RecordBatch] = []
    runs: list[list[int]] = []  # [bucket, first batch, number of batches]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            piece = table.slice(start, end - start).to_batches(max_chunksize=_BATCH_ROWS)
            runs.append([int(buckets[start]), len(batches), len(piece)])
            batches.extend(piece)
    schema = table.schema.with_metadata({b"buckets": json.dumps(runs).encode()})
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        for batch in batches:
            writer.write_batch(batch)


def take_rows(table: pa.Table, indices: pa.Array) -> pa.Table:
    """table.take(indices), a slice of indices at a time: each take concatenates its result
    into one array, which must stay under binary()'s 2 GiB of bytes."""
    if len(indices) == 0:
        return table.slice(0, 0)
    return pa.concat_tables(
        [
            table.take(indices.slice(start, _BATCH_ROWS))
            for start in range(0, len(indices), _BATCH_ROWS)
        ]
    )


# -- 3. gather ------------------------------------------------------------------------------------


# `datasets` Value dtypes of the Arrow types a curated shard holds.
_VALUE_DTYPES = {
    pa.string(): "string",
    pa.float32(): "float32",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.bool_(): "bool",
}


def _huggingface_features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` Features of a curated shard, as `datasets` stores them in Parquet."""
    features: dict[str, Any] = {}
    for f in schema:
        if f.type == IMAGE_STRUCT:
            features[f.name] = {"_type": "Image"}
        elif f.type in _VALUE_DTYPES:
            features[f.name] = {"dtype": _VALUE_DTYPES[f.type], "_type": "Value"}
        else:
            raise TypeError(f"no `datasets` feature for column {f.name} of type {f.type}")
    return features


def curated_schema() -> pa.Schema:
    """CURATED with the `datasets` features in its metadata, so `image` loads as PIL images."""
    info = {"info": {"features": _huggingface_features(CURATED)}}
    return CURATED.with_metadata({b"huggingface": json.dumps(info).encode()})


def _bucket_sources(work_dir: Path, bucket: int) -> list[int]:
    table = storage.read_table(
        bucket_sources_path(work_dir), columns=["source_id"], filters=[("bucket", "=", bucket)]
    )
    return sorted(table["source_id"].to_pylist())


def _read_bucket_piece(path: Path, bucket: int) -> list[pa.RecordBatch]:
    # A plain file (or ranged reads of the object), not a memory map: get_batch reads just
    # these batches, into owned memory.
    with storage.open_input_file(path) as source:
        reader = pa.ipc.open_file(source)
        runs = {b: (first, n) for b, first, n in json.loads(reader.schema.metadata[b"buckets"])}
        if bucket not in runs:
            raise LookupError(f"scatter file {path} holds no rows of bucket {bucket}")
        first, n = runs[bucket]
        return [reader.get_batch(i) for i in range(first, first + n)]


def gather_bucket(bucket: Bucket, work_dir: Path, out_dir: Path) -> PartResult:
    """Concatenate one bucket's pieces, sort them by shuffle key, write its curated shard."""
    started = time.perf_counter()
    pieces = [
        batch
        for source in _bucket_sources(work_dir, bucket.index)
        for batch in _read_bucket_piece(scatter_path(work_dir, source), bucket.index)
    ]
    if not pieces:
        raise LookupError(f"bucket {bucket.index} has no sources in {work_dir}")
    table = pa.Table.from_batches(pieces)
    if table.num_rows != bucket.rows:
        raise RuntimeError(
            f"bucket {bucket.index} gathered {table.num_rows} rows, selection says {bucket.rows}"
        )
    # Sorted through indices of the small columns: sorting the table itself would concatenate
    # the bucket's image bytes into one array.
    order = pc.sort_indices(
        table.select(["shuffle_key", "image_id"]),
        sort_keys=[("shuffle_key", "ascending"), ("image_id", "ascending")],
    )
    table = take_rows(table, order)
    schema = curated_schema()
    curated = pa.table([table[name] for name in schema.names], schema=schema)
    info = write_shard(curated, out_dir / shard_name(bucket.index))
    return PartResult(
        part=bucket.index,
        rows_in=bucket.rows,
        rows_out=curated.num_rows,
        shards={"data": info},
        seconds=time.perf_counter() - started,
    )
