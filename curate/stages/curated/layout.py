"""Where the curated stage keeps its intermediate files under `work_dir`.

Select writes them, scatter and gather read them; everything here is deterministic for its
inputs, reused by a resumed run, and deleted once every bucket is committed.
"""

from pathlib import Path

from curate.core import storage


def select_dir(work_dir: Path) -> Path:
    """The selection: rows per source shard, bucket sources, and selection.json (written last)."""
    return work_dir / "select"


def rows_dir(work_dir: Path, source: int) -> Path:
    """The selected rows of one source shard."""
    # DuckDB's hive-partitioned COPY names the folders so.
    return select_dir(work_dir) / "rows" / f"source_id={source}"


def bucket_sources_path(work_dir: Path) -> Path:
    """Which source shards feed each bucket, and with how many rows."""
    return select_dir(work_dir) / "bucket_sources.parquet"


def scatter_path(work_dir: Path, source: int) -> Path:
    """The intermediate file of one source's scattered images."""
    return work_dir / "scatter" / f"source-{source:08d}.arrow"


def remove_work_dir(work_dir: Path) -> None:
    """Delete the intermediate files (after every bucket is committed)."""
    for name in ("select", "scatter", "duckdb-tmp"):
        storage.remove_tree(work_dir / name)
    try:
        work_dir.rmdir()
    except OSError:
        pass  # not empty: something else lives there, leave it
