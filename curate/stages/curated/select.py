"""Step 1 of the curated stage: which retrieved images go into the dataset, and where.

DuckDB (which spills to disk) picks per image its best match and counts the retrieve rows that
picked it; an optional uniform sample cuts the selection down to a target size; a hash of
(seed, image_id) gives each image an output bucket and a shuffle key. The selection is written
per source ingest shard under `work_dir`, so each scatter task reads only its own rows (see
`curate.stages.curated.shuffle` for steps 2 and 3).
"""

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from curate.core import storage
from curate.core.atomic import write_json
from curate.core.sql import literal
from curate.stages.curated.layout import bucket_sources_path, remove_work_dir, select_dir
from schemas.errors import DataError
from schemas.shards import RETRIEVE

# Ties between equally similar matches go to the stronger evidence: the seed image itself, then a
# seed's own neighbour, then a cluster pick.
METHOD_PRIORITY: tuple[str, ...] = ("as-is", "knn", "cluster", "balanced")

# Bumped when the selection's layout or rules change, so a resumed run never reuses an old one.
_SELECTION_VERSION = 1


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


def _check_retrieve_schemas(paths: list[Path]) -> None:
    for path in paths:
        if not storage.exists(path):
            raise SelectionError(f"retrieve shard {path} does not exist")
        names = set(storage.parquet_file(path).schema_arrow.names)
        missing = [name for name in RETRIEVE.names if name not in names]
        if missing:
            raise SelectionError(f"retrieve shard {path} lacks columns {missing}")


def _load_selection(work_dir: Path, inputs: dict[str, Any]) -> Selection | None:
    manifest = select_dir(work_dir) / "selection.json"
    if not storage.exists(manifest):
        return None
    stored = storage.read_json(manifest)
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
        select_dir(selection.work_dir) / "selection.json",
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
    select_dir(work_dir).mkdir(parents=True, exist_ok=True)
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
        con.execute(f"SET temp_directory = {literal(str(tmp_dir))}")
        con.execute("SET preserve_insertion_order = false")
        if memory_limit:
            con.execute(f"SET memory_limit = {literal(memory_limit)}")
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
    columns = ", ".join(RETRIEVE.names)
    con.register("retrieve_shards", storage.dataset(paths))
    con.execute(f"CREATE VIEW retrieve AS SELECT {columns} FROM retrieve_shards")
    methods = ", ".join(literal(m) for m in METHOD_PRIORITY)
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

    priority = " ".join(f"WHEN {literal(m)} THEN {i}" for i, m in enumerate(METHOD_PRIORITY))
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
    sample_key = f"md5_number({literal(f'sample:{seed}:')} || image_id)"
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
    shuffle = f"md5_number({literal(f'shuffle:{seed}:')} || image_id)"
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
    con.execute(
        f"COPY placed TO {literal(str(select_dir(work_dir) / 'rows'))} "
        "(FORMAT parquet, PARTITION_BY (source_id), OVERWRITE_OR_IGNORE)"
    )
    con.execute(
        f"""
        COPY (SELECT bucket, source_id, count(*) AS rows FROM placed
              GROUP BY ALL ORDER BY bucket, source_id)
        TO {literal(str(bucket_sources_path(work_dir)))} (FORMAT parquet, ROW_GROUP_SIZE 65536)
        """
    )
    # DuckDB wrote these in place; on an object store root the scatter tasks on other nodes
    # read them from the store (selection.json, written after, vouches for them).
    for written in sorted(select_dir(work_dir).rglob("*.parquet")):
        storage.upload(written)
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
