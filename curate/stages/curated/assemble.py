"""The curated dataset: every retrieved image once, with its bytes and provenance, shuffled into
shards that `datasets.load_dataset("parquet", ...)` loads as images.

Three steps, each bounded in memory whatever the size of the crawl:

1. select (DuckDB, which spills to disk): per image its best match and how many retrieve rows
   picked it; an optional uniform sample down to a target size; per image an output bucket and a
   shuffle key, both from a hash of (seed, image_id). The selection is written per source ingest
   shard, so the next step reads only its own rows.
2. scatter (one task per source ingest shard): the selected images' bytes, written as one Arrow
   IPC file holding one record batch per bucket.
3. gather (one task per bucket): the bucket's batch from every source that feeds it, sorted by
   shuffle key, written as the curated shard `part-<bucket>.parquet`.

Everything below `work_dir` is intermediate: deterministic for its inputs, reused by a resumed
run, and deleted once every bucket is committed.
"""

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.shards import PartResult, shard_name, write_shard
from schemas.errors import DataError
from schemas.shards import CURATED, IMAGE_STRUCT, RETRIEVE

STAGE = "curated"

# Ties between equally similar matches go to the stronger evidence: the seed image itself, then a
# seed's own neighbour, then a cluster pick.
METHOD_PRIORITY: tuple[str, ...] = ("as-is", "knn", "cluster", "balanced")

# Bumped when the selection's layout or rules change, so a resumed run never reuses an old one.
_SELECTION_VERSION = 1

# Columns the scatter step carries from the selection into the intermediate files.
# Rows per record batch and per take: small enough that one batch's image bytes stay far under
# 2 GiB even for 32 MiB images.
_BATCH_ROWS = 64
_PROVENANCE = ["image_id", "seed_set", "seed_id", "similarity", "method", "cluster_id", "matches"]


class SelectionError(DataError, ValueError):
    """Retrieve shards that cannot be assembled (missing columns, null keys, unknown method)."""

    code = "selection_invalid"


@dataclass(frozen=True)
class SourceShard:
    """One ingest shard that holds selected images, and how many of them.

    `method` and `seed_set` are what `ingest_path_of(method, seed_set, part)` needs: "as-is" and
    the seed set for a seed set's own images; for crawl images, one of the crawl methods and seed
    sets that picked them (the crawl shard is the same whichever).
    """

    index: int
    method: str
    seed_set: str
    part: int
    rows: int
    ingest: Path | None = None  # filled in by the caller before scatter

    @property
    def origin(self) -> str:
        return "seed" if self.method == "as-is" else "crawl"


@dataclass(frozen=True)
class Bucket:
    """One output shard of the curated stage: its part number and expected rows."""

    index: int
    rows: int


@dataclass
class Selection:
    """The selection as written under work_dir: sources to scatter, buckets to gather, counts."""

    work_dir: Path
    sources: list[SourceShard]
    buckets: list[Bucket]
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.buckets)


# -- layout of work_dir ---------------------------------------------------------------------------


def _select_dir(work_dir: Path) -> Path:
    return work_dir / "select"


def _rows_dir(work_dir: Path, source: int) -> Path:
    # DuckDB's hive-partitioned COPY names the folders so.
    return _select_dir(work_dir) / "rows" / f"source_id={source}"


def _bucket_sources_path(work_dir: Path) -> Path:
    return _select_dir(work_dir) / "bucket_sources.parquet"


def scatter_path(work_dir: Path, source: int) -> Path:
    """The intermediate file of one source's scattered images."""
    return work_dir / "scatter" / f"source-{source:08d}.arrow"


def remove_work_dir(work_dir: Path) -> None:
    """Delete the intermediate files (after every bucket is committed)."""
    for name in ("select", "scatter", "duckdb-tmp"):
        shutil.rmtree(work_dir / name, ignore_errors=True)
    try:
        work_dir.rmdir()
    except OSError:
        pass  # not empty: something else lives there, leave it


# -- 1. select ------------------------------------------------------------------------------------


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_retrieve_schemas(paths: list[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise SelectionError(f"retrieve shard {path} does not exist")
        names = set(pq.read_schema(path).names)
        missing = [name for name in RETRIEVE.names if name not in names]
        if missing:
            raise SelectionError(f"retrieve shard {path} lacks columns {missing}")


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename: it exists whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_selection(work_dir: Path, inputs: dict[str, Any]) -> Selection | None:
    manifest = _select_dir(work_dir) / "selection.json"
    if not manifest.is_file():
        return None
    stored = json.loads(manifest.read_text())
    if stored.get("inputs") != inputs:
        return None
    return Selection(
        work_dir=work_dir,
        sources=[SourceShard(**s) for s in stored["sources"]],
        buckets=[Bucket(**b) for b in stored["buckets"]],
        counts=stored["counts"],
    )


def _save_selection(selection: Selection, inputs: dict[str, Any]) -> None:
    # Written last: its presence says the whole selection folder is complete.
    write_json(
        _select_dir(selection.work_dir) / "selection.json",
        {
            "inputs": inputs,
            "sources": [
                {k: v for k, v in s.__dict__.items() if k != "ingest"} for s in selection.sources
            ],
            "buckets": [b.__dict__ for b in selection.buckets],
            "counts": selection.counts,
        },
    )


def select(
    retrieve_paths: list[Path],
    work_dir: Path,
    *,
    target_size: int | None,
    rows_per_shard: int = 10_000,
    seed: int = 0,
    memory_limit: str | None = None,
) -> Selection:
    """One row per retrieved image with its best match, sampled, bucketed and keyed for shuffling.

    The best match is the highest similarity; ties go by METHOD_PRIORITY, then seed set, seed id.
    With target_size, the images of smallest hash(seed, image_id) stay: a uniform sample that is
    the same on every run. A selection already under work_dir for the same inputs is reused.
    """
    if target_size is not None and target_size < 1:
        raise ValueError(f"target_size must be at least 1, got {target_size}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    paths = [Path(p) for p in retrieve_paths]
    _check_retrieve_schemas(paths)
    inputs = {
        "version": _SELECTION_VERSION,
        "retrieve": [str(p) for p in paths],
        "target_size": target_size,
        "rows_per_shard": rows_per_shard,
        "seed": seed,
    }
    if (cached := _load_selection(work_dir, inputs)) is not None:
        return cached
    # A different (or half-written) selection invalidates everything scattered from it.
    remove_work_dir(work_dir)
    _select_dir(work_dir).mkdir(parents=True, exist_ok=True)
    if not paths:
        selection = Selection(work_dir, [], [], _empty_counts(target_size))
        _save_selection(selection, inputs)
        return selection

    tmp_dir = work_dir / "duckdb-tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # An in-memory database that spills to work_dir: never the catalog, which other processes
    # share and which must only hold short transactions.
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET temp_directory = {sql_literal(str(tmp_dir))}")
        con.execute("SET preserve_insertion_order = false")
        if memory_limit:
            con.execute(f"SET memory_limit = {sql_literal(memory_limit)}")
        selection = _select_with(con, paths, work_dir, target_size, rows_per_shard, seed)
    finally:
        con.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _save_selection(selection, inputs)
    return selection


def _empty_counts(target_size: int | None) -> dict[str, Any]:
    return {
        "retrieve_rows": 0,
        "images": 0,
        "selected": 0,
        "target_size": target_size,
        "collisions": {"collided_images": 0, "extra_rows": 0, "cross_set_images": 0},
        "per_seed_set": {},
        "per_method": {},
        "sources": 0,
        "buckets": 0,
    }


def _select_with(
    con: duckdb.DuckDBPyConnection,
    paths: list[Path],
    work_dir: Path,
    target_size: int | None,
    rows_per_shard: int,
    seed: int,
) -> Selection:
    files = "[" + ", ".join(sql_literal(str(p)) for p in paths) + "]"
    columns = ", ".join(RETRIEVE.names)
    con.execute(f"CREATE VIEW retrieve AS SELECT {columns} FROM read_parquet({files})")
    methods = ", ".join(sql_literal(m) for m in METHOD_PRIORITY)
    bad, unknown = con.execute(
        f"""
        SELECT count(*) FILTER (WHERE image_id IS NULL OR seed_set IS NULL OR part IS NULL
                                   OR item IS NULL OR similarity IS NULL OR method IS NULL),
               min(method) FILTER (WHERE method NOT IN ({methods}))
        FROM retrieve
        """
    ).fetchone()
    if bad:
        raise SelectionError(
            f"{bad} retrieve rows have a null image_id, seed_set, part, item, similarity or method"
        )
    if unknown is not None:
        raise SelectionError(
            f"retrieve method {unknown!r} is not one of {', '.join(METHOD_PRIORITY)}"
        )

    priority = " ".join(f"WHEN {sql_literal(m)} THEN {i}" for i, m in enumerate(METHOD_PRIORITY))
    # arg_min over a struct key compares field by field: the best match in one aggregate pass,
    # which DuckDB can spill, instead of a window over every retrieve row.
    con.execute(
        f"""
        CREATE TABLE matched AS
        SELECT image_id,
               count(*)::INTEGER AS matches,
               count(DISTINCT seed_set)::INTEGER AS seed_sets,
               arg_min(
                   {{'seed_set': seed_set, 'seed_id': seed_id, 'part': part, 'item': item,
                     'similarity': similarity, 'method': method, 'cluster_id': cluster_id}},
                   {{'similarity': -similarity, 'method': CASE method {priority} END,
                     'seed_set': seed_set, 'seed_id': coalesce(seed_id, ''), 'part': part,
                     'item': item, 'rank': rank}}
               ) AS best
        FROM retrieve GROUP BY image_id
        """
    )
    sample_key = f"md5_number({sql_literal(f'sample:{seed}:')} || image_id)"
    limit = f"ORDER BY {sample_key}, image_id LIMIT {int(target_size)}" if target_size else ""
    con.execute(
        f"""
        CREATE TABLE selected AS
        SELECT image_id, matches, seed_sets, best.seed_set AS seed_set, best.seed_id AS seed_id,
               best.part AS part, best.item AS item, best.similarity AS similarity,
               best.method AS method, best.cluster_id AS cluster_id
        FROM matched {limit}
        """
    )
    (selected,) = con.execute("SELECT count(*) FROM selected").fetchone()
    n_buckets = max(1, math.ceil(selected / rows_per_shard))
    shuffle = f"md5_number({sql_literal(f'shuffle:{seed}:')} || image_id)"
    # Crawl images are read from the crawl's ingest shard of `part` whichever seed set picked
    # them; a seed set's own (as-is) images from that set's cached ingest shards.
    con.execute(
        f"""
        CREATE TABLE keyed AS
        SELECT *, ({shuffle} % {n_buckets})::INTEGER AS raw_bucket,
               ({shuffle} >> 64)::UBIGINT AS shuffle_key,
               CASE WHEN method = 'as-is' THEN seed_set END AS source_set
        FROM selected
        """
    )
    con.execute(
        """
        CREATE TABLE sources AS
        SELECT (row_number() OVER (ORDER BY source_set NULLS FIRST, part) - 1)::INTEGER
                   AS source_id,
               source_set, part, min(method) AS method, min(seed_set) AS seed_set,
               count(*) AS rows
        FROM keyed GROUP BY source_set, part
        """
    )
    # Hashing leaves a bucket empty now and then on small selections; parts stay dense.
    con.execute(
        """
        CREATE TABLE buckets AS
        SELECT raw_bucket, (row_number() OVER (ORDER BY raw_bucket) - 1)::INTEGER AS bucket,
               count(*) AS rows
        FROM keyed GROUP BY raw_bucket
        """
    )
    con.execute(
        """
        CREATE TABLE placed AS
        SELECT s.source_id, k.image_id, k.seed_set, k.seed_id, k.similarity, k.method,
               k.cluster_id, k.matches, k.part, k.item, b.bucket, k.shuffle_key
        FROM keyed k
        JOIN sources s ON k.source_set IS NOT DISTINCT FROM s.source_set AND k.part = s.part
        JOIN buckets b USING (raw_bucket)
        """
    )
    rows_dir = _select_dir(work_dir) / "rows"
    con.execute(
        f"COPY placed TO {sql_literal(str(rows_dir))} "
        "(FORMAT parquet, PARTITION_BY (source_id), OVERWRITE_OR_IGNORE)"
    )
    con.execute(
        f"""
        COPY (SELECT bucket, source_id, count(*) AS rows FROM placed
              GROUP BY ALL ORDER BY bucket, source_id)
        TO {sql_literal(str(_bucket_sources_path(work_dir)))} (FORMAT parquet, ROW_GROUP_SIZE 65536)
        """
    )
    sources = [
        SourceShard(index=i, method=method, seed_set=seed_set, part=part, rows=rows)
        for i, method, seed_set, part, rows in con.execute(
            "SELECT source_id, method, seed_set, part, rows FROM sources ORDER BY source_id"
        ).fetchall()
    ]
    buckets = [
        Bucket(index=i, rows=rows)
        for i, rows in con.execute("SELECT bucket, rows FROM buckets ORDER BY bucket").fetchall()
    ]
    counts = _selection_counts(con, target_size)
    counts |= {"sources": len(sources), "buckets": len(buckets)}
    return Selection(work_dir, sources, buckets, counts)


def _grouped(con: duckdb.DuckDBPyConnection, table: str, column: str) -> dict[str, int]:
    rows = con.execute(
        f"SELECT {column}, count(*) FROM {table} GROUP BY 1 ORDER BY 2 DESC, 1"
    ).fetchall()
    return {key: int(n) for key, n in rows}


def _selection_counts(con: duckdb.DuckDBPyConnection, target_size: int | None) -> dict[str, Any]:
    images, rows, collided, cross_set = con.execute(
        """
        SELECT count(*), coalesce(sum(matches), 0), count(*) FILTER (WHERE matches > 1),
               count(*) FILTER (WHERE seed_sets > 1)
        FROM matched
        """
    ).fetchone()
    (selected,) = con.execute("SELECT count(*) FROM selected").fetchone()
    retrieved_sets = con.execute(
        "SELECT best.seed_set, count(*) FROM matched GROUP BY 1"
    ).fetchall()
    retrieved_methods = con.execute(
        "SELECT best.method, count(*) FROM matched GROUP BY 1"
    ).fetchall()
    selected_sets = _grouped(con, "selected", "seed_set")
    selected_methods = _grouped(con, "selected", "method")
    return {
        "retrieve_rows": int(rows),
        "images": int(images),
        "selected": int(selected),
        "target_size": target_size,
        "collisions": {
            "collided_images": int(collided),  # picked by more than one retrieve row
            "extra_rows": int(rows - images),  # rows beyond the first per image
            "cross_set_images": int(cross_set),  # picked by more than one seed set
        },
        # Images credited to each seed set / method by their best match, before and after the
        # target-size sample.
        "per_seed_set": {
            name: {"retrieved": int(n), "selected": selected_sets.get(name, 0)}
            for name, n in sorted(retrieved_sets)
        },
        "per_method": {
            name: {"retrieved": int(n), "selected": selected_methods.get(name, 0)}
            for name, n in sorted(retrieved_methods)
        },
    }


# -- 2. scatter -----------------------------------------------------------------------------------


def _read_selected_rows(work_dir: Path, source: int) -> pa.Table:
    files = sorted(_rows_dir(work_dir, source).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no selection rows for source {source} in {work_dir}")
    return pa.concat_tables(pq.read_table(f) for f in files)


def _ingest_images(ingest: Path, wanted: set[str]) -> pa.Table:
    """The first row with bytes of every wanted image in an ingest shard, streamed by batch."""
    found: list[pa.RecordBatch] = []
    seen: set[str] = set()
    wanted_array = pa.array(sorted(wanted), pa.string())
    shard = pq.ParquetFile(ingest)
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
    path.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    table = pq.read_table(
        _bucket_sources_path(work_dir), columns=["source_id"], filters=[("bucket", "=", bucket)]
    )
    return sorted(table["source_id"].to_pylist())


def _read_bucket_piece(path: Path, bucket: int) -> list[pa.RecordBatch]:
    # A plain file, not a memory map: get_batch reads just these batches, into owned memory.
    with pa.OSFile(str(path), "rb") as source:
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
