"""The trainer's input: curated shards named by a folder, a glob, a file or a job id, checked.

A shard is usable when its footer reads and it has an `image` column of {bytes, path} structs;
nothing else of it is read here.
"""

import glob
from pathlib import Path

import pyarrow as pa

from curate.core import storage
from curate.settings import Settings
from schemas.errors import DataError, NotFoundError
from schemas.job import StageName

IMAGE_COLUMN = "image"
_GLOB_CHARS = set("*?[")


class ShardsError(DataError, ValueError):
    """Training data that cannot be used: nothing found, or a shard that is not curated Parquet."""

    code = "train_shards_invalid"


class ShardsNotFound(NotFoundError, ShardsError):
    """A training-data source that names no shards: no such folder, glob match or job."""

    code = "train_shards_not_found"


def shard_row_groups(path: Path) -> list[int]:
    """Rows per row group of a curated shard, read from its footer; ShardsError if unusable."""
    try:
        metadata = storage.parquet_file(path).metadata
    except (OSError, pa.ArrowException) as error:
        raise ShardsError(f"{path}: not a readable Parquet file ({error})") from None
    schema = metadata.schema.to_arrow_schema()
    index = schema.get_field_index(IMAGE_COLUMN)
    if index < 0:
        raise ShardsError(
            f"{path}: no `{IMAGE_COLUMN}` column (has {', '.join(schema.names)}); "
            "expected a curated shard"
        )
    dtype = schema.field(index).type
    if not (pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0):
        raise ShardsError(f"{path}: `{IMAGE_COLUMN}` is {dtype}, not a {{bytes, path}} struct")
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def _job_shards(job_id: str, settings: Settings) -> list[Path]:
    from curate.catalog import Catalog, CatalogError

    catalog_file = settings.catalog_file
    if not catalog_file.exists():
        raise ShardsNotFound(
            f"{job_id!r} is not a file, folder or glob, and there is no catalog at {catalog_file} "
            "to look it up as a job id"
        )
    try:
        paths = Catalog(catalog_file, settings.root).shard_paths(job_id, StageName.CURATED)
    except CatalogError as error:
        raise ShardsError(f"job {job_id!r}: {error}") from None
    if not paths:
        raise ShardsNotFound(
            f"{job_id!r} is not a file, folder or glob, nor a job with curated shards in "
            f"{catalog_file}"
        )
    missing = [path for path in paths if not storage.exists(path)]
    if missing:
        raise ShardsError(
            f"job {job_id!r}: {len(missing)} registered curated shard(s) missing, "
            f"first {missing[0]}"
        )
    return paths


def resolve_shards(source: str, settings: Settings | None = None) -> list[Path]:
    """A folder of .parquet, a glob, a single file, or a job id (its `curated` shards through the
    catalog, curate.catalog.Catalog(settings.catalog_file, settings.root).shard_paths(job,
    "curated")). Raises ShardsError naming the source when nothing usable is found."""
    if not source:
        raise ShardsNotFound("no training data given: expected a folder, glob, file or job id")
    path = Path(source).expanduser()
    if path.is_dir():
        # Dot-prefixed names are write_shard's temporaries, never whole shards.
        files = sorted(p for p in path.glob("*.parquet") if p.is_file() and p.name[0] != ".")
        if not files:
            raise ShardsNotFound(f"{source}: folder holds no .parquet shards")
    elif path.is_file():
        files = [path]
    elif _GLOB_CHARS & set(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ShardsNotFound(f"{source}: glob matches no files")
    else:
        files = _job_shards(source, settings or Settings())
    for file in files:
        shard_row_groups(file)
    return files
