"""Parquet shards that exist whole or not at all."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.atomic import publish, temporary_name
from curate.core.storage import file_sha256

_ROW_GROUP_ROWS = 1024


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    bytes: int
    checksum: str  # sha256 of the file


def _leaf_columns(
    fields: Iterable[pa.Field], prefix: str = ""
) -> Iterator[tuple[str, pa.DataType]]:
    for f in fields:
        if pa.types.is_struct(f.type):
            yield from _leaf_columns(f.type, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.type


def _writer_options(schema: pa.Schema) -> dict:
    """zstd, dictionaries and statistics for the small columns; none of them for binary ones.

    Binary columns hold encoded images: compressing them again buys nothing, and dictionary
    attempts and min/max statistics over megabytes of bytes cost more than the whole write.
    """
    leaves = list(_leaf_columns(schema))
    small = [name for name, dtype in leaves if not pa.types.is_binary(dtype)]
    return {
        "compression": {name: ("zstd" if name in small else "none") for name, _ in leaves},
        "use_dictionary": small,
        "write_statistics": small,
    }


def write_shard(table: pa.Table, path: Path) -> ShardInfo:
    """Write `table` to `path` through a temporary file and an atomic rename."""
    with ShardWriter(path, table.schema) as writer:
        writer.write(table)
    return writer.info


class ShardWriter:
    """A shard written piece by piece, whole or not at all: memory is one piece.

    A crash leaves at most a dot-prefixed temporary file, never a partial shard. The temporary
    name is unique, so a worker left over from a killed run cannot collide with its re-run.
    `info` is set once the `with` block has ended without an error.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self.info: ShardInfo | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_name(path)
        self._writer = pq.ParquetWriter(self._tmp, schema, **_writer_options(schema))

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=_ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            self._writer.close()
            if error is not None:
                return
            checksum = file_sha256(self._tmp)
            size = self._tmp.stat().st_size
            publish(self._tmp, self.path)
            self.info = ShardInfo(path=self.path, rows=self.rows, bytes=size, checksum=checksum)
        finally:
            self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardRef:
    """A registered shard as the input of a later stage: its part number and file."""

    index: int
    path: Path


def shard_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


@dataclass
class PartResult:
    """What one part of a stage produced: its shards and what happened to its input rows."""

    part: int
    rows_in: int
    rows_out: int
    shards: dict[str, ShardInfo]  # kind -> shard
    error_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    node: str | None = None  # the Ray node that ran the part (set by the executor)

    @property
    def errors(self) -> int:
        return sum(self.error_counts.values())
