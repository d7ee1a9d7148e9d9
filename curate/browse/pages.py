"""One value of a Parquet binary column, read without reading its row group: the image bytes of
one row of an ingest shard.

Parquet readers (pyarrow, DuckDB) decode at least a whole column chunk, and an ingest shard's
image column holds ~1,000 encoded images per row group, often in a single data page: 50-100 MB
read to serve one thumbnail. Our shards store that column uncompressed and PLAIN-encoded
(curate/core/shards.py), so every value sits verbatim in the file behind a 4-byte length. The
first read of a row group parses its page headers (Thrift compact protocol) and definition levels
(which rows are null: repeats within a part) and hops from length to length with 4-byte reads,
never reading the values; the offsets are cached, and every later value is one `pread`.
Anything unexpected (compression, dictionary pages, an unknown layout) raises `Unsupported`; the
caller then reads the row group the ordinary way.
"""

import bisect
import os
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq


class Unsupported(Exception):
    """The column chunk is not laid out the way this reader handles."""


# -- Thrift compact protocol (just what page headers use) ------------------------------------

_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = range(9)
_LIST, _SET, _MAP, _STRUCT = 9, 10, 11, 12


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise EOFError
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise EOFError
        self.pos += n

    def value(self, kind: int):
        if kind in (_TRUE, _FALSE):
            return kind == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.skip(8)
            return None
        if kind == _BINARY:
            self.skip(self.varint())
            return None
        if kind in (_LIST, _SET):
            head = self.byte()
            size, element = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            for _ in range(size):
                # Booleans inside a list are one byte each, not folded into a type nibble.
                self.byte() if element in (_TRUE, _FALSE) else self.value(element)
            return None
        if kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.value(types >> 4)
                    self.value(types & 0x0F)
            return None
        if kind == _STRUCT:
            return self.struct()
        raise Unsupported(f"thrift type {kind}")

    def struct(self) -> dict[int, object]:
        fields: dict[int, object] = {}
        last = 0
        while True:
            head = self.byte()
            if head == _STOP:
                return fields
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind)


# -- page layout ------------------------------------------------------------------------------

_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _RLE = 0, 3


@dataclass(frozen=True)
class _Page:
    first_row: int  # within the row group
    rows: int
    body: int  # file offset of the page body
    size: int
    v2: tuple[int, int] | None  # (repetition, definition) level byte lengths of a v2 page


@dataclass(frozen=True)
class _Chunk:
    """A row group's values: file offsets and lengths, row by row (offset -1: null)."""

    offsets: array
    lengths: array


def _read_at(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise Unsupported(f"short read at {offset}")
    return data


def _page_headers(fd: int, start: int, end: int) -> list[_Page]:
    pages: list[_Page] = []
    offset, row = start, 0
    while offset < end:
        window = 256
        while True:
            reader = _Reader(os.pread(fd, min(window, end - offset), offset))
            try:
                header = reader.struct()
                break
            except EOFError:
                if window >= end - offset:
                    raise Unsupported("truncated page header") from None
                window *= 4
        kind, size = header.get(1), header.get(3)
        if not isinstance(size, int):
            raise Unsupported("page header without a size")
        body = offset + reader.pos
        if kind == _DATA_PAGE:
            info = header.get(5)
            if (
                not isinstance(info, dict)
                or info.get(2) != _PLAIN
                or info.get(3) not in (None, _RLE)
            ):
                raise Unsupported("data page not PLAIN with RLE levels")
            pages.append(_Page(row, int(info[1]), body, size, None))  # type: ignore[arg-type]
            row += int(info[1])  # type: ignore[arg-type]
        elif kind == _DATA_PAGE_V2:
            info = header.get(8)
            if not isinstance(info, dict) or info.get(4) != _PLAIN or info.get(7) is True:
                raise Unsupported("v2 data page not PLAIN and uncompressed")
            levels = (int(info[6]), int(info[5]))  # type: ignore[arg-type]
            pages.append(_Page(row, int(info[3]), body, size, levels))  # type: ignore[arg-type]
            row += int(info[3])  # type: ignore[arg-type]
        else:
            # A dictionary page means dictionary-encoded values: not a verbatim layout.
            raise Unsupported(f"page type {kind}")
        offset = body + size
    return pages


def _levels(data: bytes, bit_width: int, count: int) -> list[int]:
    """`count` levels of the RLE / bit-packing hybrid encoding."""
    out: list[int] = []
    reader = _Reader(data)
    width = (bit_width + 7) // 8
    while len(out) < count:
        header = reader.varint()
        if header & 1:
            groups = header >> 1
            raw = data[reader.pos : reader.pos + groups * bit_width]
            reader.skip(groups * bit_width)
            bits = int.from_bytes(raw, "little")
            mask = (1 << bit_width) - 1
            out.extend((bits >> (i * bit_width)) & mask for i in range(groups * 8))
        else:
            value = int.from_bytes(data[reader.pos : reader.pos + width], "little")
            reader.skip(width)
            out.extend([value] * (header >> 1))
    return out[:count]


def _value_offsets(fd: int, page: _Page, max_definition: int) -> list[tuple[int, int]]:
    """(file offset, length) of every row's value in the page; (-1, 0) for a null.

    Hops from length prefix to length prefix with 4-byte reads: the values themselves are never
    read here, so a page of 1,000 photos costs 1,000 tiny reads, once.
    """
    start, end = page.body, page.body + page.size
    if page.v2 is not None:
        repetition, definition = page.v2
        levels_at, values_at = start + repetition, start + repetition + definition
    elif max_definition:
        # v1: the definition levels carry their own 4-byte length.
        levels_at = start + 4
        values_at = levels_at + struct.unpack("<I", _read_at(fd, start, 4))[0]
    else:
        levels_at = values_at = start
    if max_definition:
        raw = _read_at(fd, levels_at, values_at - levels_at)
        present = [
            level == max_definition
            for level in _levels(raw, max_definition.bit_length(), page.rows)
        ]
    else:
        present = [True] * page.rows
    offsets = []
    position = values_at
    for here in present:
        if not here:
            offsets.append((-1, 0))
            continue
        length = struct.unpack("<I", _read_at(fd, position, 4))[0]
        if position + 4 + length > end:
            raise Unsupported("a value runs past its page")
        offsets.append((position + 4, length))
        position += 4 + length
    return offsets


# -- the column reader ------------------------------------------------------------------------


class BinaryColumnReader:
    """Reads single values of one binary leaf column (e.g. `image.bytes`) of Parquet files.

    File footers and page layouts are cached by (path, size, mtime): shards never change once
    registered, and a rewritten file gets a new key.
    """

    def __init__(self, column: str, cache_chunks: int = 1024) -> None:
        self.column = column
        self._lock = threading.Lock()
        self._footers: OrderedDict[tuple, tuple] = OrderedDict()
        self._chunks: OrderedDict[tuple, _Chunk] = OrderedDict()
        self._limit = cache_chunks

    def _footer(self, path: Path, key: tuple) -> tuple:
        with self._lock:
            if key in self._footers:
                self._footers.move_to_end(key)
                return self._footers[key]
        meta = pq.ParquetFile(path).metadata
        leaf = next(
            (i for i in range(meta.num_columns) if meta.schema.column(i).path == self.column), None
        )
        if leaf is None:
            raise Unsupported(f"{path} has no column {self.column}")
        starts = [0]
        for group in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(group).num_rows)
        descriptor = meta.schema.column(leaf)
        if descriptor.max_repetition_level:
            raise Unsupported(f"{self.column} is a repeated column")
        footer = (meta, leaf, descriptor.max_definition_level, starts)
        with self._lock:
            self._footers[key] = footer
            while len(self._footers) > self._limit:
                self._footers.popitem(last=False)
        return footer

    def _chunk(self, fd: int, path: Path, key: tuple, group: int) -> _Chunk:
        meta, leaf, max_definition, _ = self._footer(path, key)
        with self._lock:
            if (key, group) in self._chunks:
                self._chunks.move_to_end((key, group))
                return self._chunks[(key, group)]
        column = meta.row_group(group).column(leaf)
        if column.compression != "UNCOMPRESSED" or column.has_dictionary_page:
            raise Unsupported(f"column chunk is {column.compression}, dictionary pages")
        start = column.data_page_offset
        offsets, lengths = array("q"), array("q")
        for page in _page_headers(fd, start, start + column.total_compressed_size):
            for offset, length in _value_offsets(fd, page, max_definition):
                offsets.append(offset)
                lengths.append(length)
        if len(offsets) != meta.row_group(group).num_rows:
            rows = meta.row_group(group).num_rows
            raise Unsupported(f"pages hold {len(offsets)} values for {rows} rows")
        chunk = _Chunk(offsets, lengths)
        with self._lock:
            self._chunks[(key, group)] = chunk
            while len(self._chunks) > self._limit:
                self._chunks.popitem(last=False)
        return chunk

    def read(self, path: Path, row: int) -> bytes | None:
        """The value at 0-based `row` of the file (None when null); raises Unsupported when the
        chunk's layout is not one this reader handles."""
        stat = os.stat(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        starts = self._footer(path, key)[3]
        if not 0 <= row < starts[-1]:
            raise IndexError(f"row {row} of {path} ({starts[-1]} rows)")
        group = bisect.bisect_right(starts, row) - 1
        fd = os.open(path, os.O_RDONLY)
        try:
            chunk = self._chunk(fd, path, key, group)
            at = row - starts[group]
            if chunk.offsets[at] < 0:
                return None
            return _read_at(fd, chunk.offsets[at], chunk.lengths[at])
        finally:
            os.close(fd)
