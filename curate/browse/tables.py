"""Reading the browse index's Parquet files by position and by key, decoding only the row groups a
request needs.

Every index file is immutable under its name, so its footer (row counts, each row group's min
and max key) is read once and kept. A page of a listing stored in its order is a contiguous row
range (`RowRanges`); a lookup in a file sorted by its key reads the row groups whose key range
holds the key (`SortedFile`). Both go through pyarrow directly: on these small reads a SQL
engine's planning alone costs several times the read.
"""

import bisect
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _row_starts(meta: pq.FileMetaData) -> list[int]:
    starts = [0]
    for group in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(group).num_rows)
    return starts


class RowRanges:
    """Rows of one column by position."""

    def __init__(self, path: Path, column: str) -> None:
        self.path = path
        self.column = column
        self.meta = pq.ParquetFile(path).metadata
        self.starts = _row_starts(self.meta)

    def read(self, start: int, stop: int) -> list[Any]:
        if stop <= start:
            return []
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, stop - 1) - 1
        parquet = pq.ParquetFile(self.path, metadata=self.meta)
        table = parquet.read_row_groups(list(range(first, last + 1)), columns=[self.column])
        return table.column(0).slice(start - self.starts[first], stop - start).to_pylist()


class SortedFile:
    """A file sorted by a string key column: the rows holding one key."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.meta = pq.ParquetFile(path).metadata
        column = self.meta.schema.names.index(key)
        self.mins: list[str] = []
        self.maxs: list[str] = []
        for group in range(self.meta.num_row_groups):
            stats = self.meta.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:
                # No statistics: every row group is a candidate (correct, only slower).
                self.mins.append("")
                self.maxs.append("\U0010ffff")
            else:
                self.mins.append(stats.min)
                self.maxs.append(stats.max)

    def find(self, value: str, columns: list[str]) -> list[dict[str, Any]]:
        """The rows whose key is `value` (in file order), as dicts of `columns`."""
        first = bisect.bisect_left(self.maxs, value)
        groups = []
        for group in range(first, len(self.mins)):
            if self.mins[group] > value:
                break
            groups.append(group)
        if not groups:
            return []
        parquet = pq.ParquetFile(self.path, metadata=self.meta)
        table = parquet.read_row_groups(groups, columns=list(dict.fromkeys([self.key, *columns])))
        found = table.filter(pc.equal(table.column(self.key), pa.scalar(value, pa.string())))
        return found.select(columns).to_pylist()


class KeyPrefixes:
    """The first 64 bits of every hex key of a file, sorted: whether the file may hold a key
    costs a binary search in memory (8 bytes a row) instead of a row-group read. A hit is
    confirmed by reading the file; a miss is certain."""

    def __init__(self, path: Path, key: str) -> None:
        keys = pq.read_table(path, columns=[key]).column(0).to_pylist()
        self.prefixes = np.sort(np.array([int(k[:16], 16) for k in keys], dtype=np.uint64))

    def may_hold(self, value: str) -> bool:
        try:
            prefix = np.uint64(int(value[:16], 16))
        except ValueError:
            return False
        at = int(np.searchsorted(self.prefixes, prefix))
        return at < len(self.prefixes) and self.prefixes[at] == prefix


class OpenFiles:
    """`SortedFile`s, `RowRanges` and `KeyPrefixes` by (path, key), kept for reuse: the least
    recently used go past `limit` (4,096 files of 10,000 images: ~330 MB of prefixes)."""

    def __init__(self, limit: int = 4096) -> None:
        self._files: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def _get(self, kind: type, path: Path, key: str) -> Any:
        with self._lock:
            found = self._files.get((kind, path, key))
            if found is not None:
                self._files.move_to_end((kind, path, key))
                return found
        opened = kind(path, key)
        with self._lock:
            self._files[(kind, path, key)] = opened
            while len(self._files) > self.limit:
                self._files.popitem(last=False)
        return opened

    def sorted(self, path: Path, key: str) -> SortedFile:
        return self._get(SortedFile, path, key)

    def prefixes(self, path: Path, key: str) -> KeyPrefixes:
        return self._get(KeyPrefixes, path, key)

    def ranges(self, path: Path, column: str) -> RowRanges:
        return self._get(RowRanges, path, column)
