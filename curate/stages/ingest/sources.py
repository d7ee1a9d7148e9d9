"""Source detection and the split of a source into parts, each one shard of ingest output.

A part is a deterministic slice of the source (the same source always splits the same way), so
a re-run of a job can skip the parts whose shards are registered.
"""

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from curate.stages.ingest.confine import glob_base, real_roots, within
from schemas.errors import InputError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jfif .png .webp .gif .bmp .tif .tiff .avif .jxl .heic .ppm .pgm .pbm".split()
)
URL_LIST_EXTENSIONS = frozenset({".txt", ".csv", ".tsv", ".jsonl"})
# Column names under which image-bytes Parquet files carry their images: the Hugging Face image
# struct, img2dataset's output, and common variants.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
# WebDataset member extensions that hold the sample's image, in order of preference.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")

PartKind = Literal["files", "urls", "tar", "parquet"]


class SourceError(InputError, ValueError):
    """The source itself cannot be read: the job cannot start."""

    code = "source_invalid"


@dataclass(frozen=True)
class SourcePart:
    index: int
    kind: PartKind
    # files: paths; urls: (url, metadata JSON) pairs
    items: tuple[Any, ...] = ()
    # tar and parquet parts name a file (and for parquet, its row groups)
    path: str | None = None
    row_groups: tuple[int, ...] = ()
    image_column: str | None = None
    # files parts: the resolved folders every item must resolve within (empty: no check)
    boundary: tuple[str, ...] = ()

    @property
    def size(self) -> int | None:
        return len(self.items) if self.kind in ("files", "urls") else None


@dataclass
class Source:
    """A detected source: what kind, which files, and how to split it."""

    kind: PartKind
    files: list[Path]
    description: str
    url_column: str = "url"
    image_column: str | None = None
    skipped_files: int = 0  # non-image files in a folder source, reported in the stage metrics
    # The resolved folders a listed file must resolve within (see confine.py); empty when the
    # source names its one file itself.
    boundary: tuple[str, ...] = ()

    def parts(self, shard_size: int) -> Iterator[SourcePart]:
        if self.kind == "files":
            yield from _file_parts(self.files, shard_size, self.boundary)
        elif self.kind == "urls":
            yield from _url_parts(self.files, self.url_column, shard_size)
        elif self.kind == "tar":
            for index, path in enumerate(self.files):
                yield SourcePart(index=index, kind="tar", path=str(path))
        else:
            yield from _parquet_parts(self.files, self.image_column, shard_size)

    def parts_total(self, shard_size: int) -> int:
        if self.kind == "files":
            return -(-len(self.files) // shard_size)
        if self.kind == "tar":
            return len(self.files)
        if self.kind == "parquet":
            return sum(1 for _ in _parquet_parts(self.files, self.image_column, shard_size))
        rows = sum(_count_url_rows(path, self.url_column) for path in self.files)
        return -(-rows // shard_size)


# -- detection ----------------------------------------------------------------------------------


def detect_source(
    source: str, url_column: str = "url", roots: Sequence[Path | str] | None = None
) -> Source:
    """Work out what `source` is: a folder, a glob, URL lists, WebDataset tars or Parquet.

    Files found by walking a folder or matching a glob must resolve within the source folder (the
    glob's fixed part), or within `roots` when given: an image file whose symlink leads elsewhere
    becomes an `outside_root` error row at ingest, never read; a .tar, .parquet or URL list that
    does is refused here. A file the source names itself is read as named, unless `roots` are
    given and it lies outside them.
    """
    if source.startswith(("http://", "https://")):
        raise SourceError(
            f"{source!r} is a single URL; put URLs in a .txt (one per line) or a "
            ".csv/.tsv/.jsonl/.parquet file with a 'url' column and pass that file"
        )
    listed = glob.has_magic(source)
    if listed:
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
        if not matches:
            raise SourceError(f"source glob {source!r} matches nothing")
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"source {source!r} does not exist")
        matches = [path]
        listed = path.is_dir()
    boundary: tuple[str, ...] = ()
    if roots:
        boundary = real_roots(roots)
    elif listed:
        boundary = real_roots([glob_base(source)])
    files: list[Path] = []
    skipped = 0
    for match in matches:
        if match.is_dir():
            found, skipped_here = _walk_images(match)
            files.extend(found)
            skipped += skipped_here
        elif match.is_file():
            files.append(match)
    outside = {path for path in files if boundary and not within(os.path.realpath(path), boundary)}
    for path in files:
        if path not in outside and not os.access(path, os.R_OK):
            raise SourceError(f"source file {path} is not readable")
    suffixes = {p.suffix.lower() for p in files}
    if not files:
        raise SourceError(f"source {source!r} holds no image, URL-list, .tar or .parquet files")
    if suffixes <= IMAGE_EXTENSIONS:
        description = f"{len(files)} image files"
        return Source("files", files, description, skipped_files=skipped, boundary=boundary)
    if outside:
        # A shard or a URL list is the source itself, not an item that can fail alone.
        raise SourceError(
            f"source file {min(outside)} is a symlink that leads outside "
            f"{'the allowed roots' if roots else 'the source folder'}"
        )
    if any(m.is_dir() for m in matches):
        # A folder's non-image files were already set aside; mixed kinds only come from globs.
        raise SourceError(f"source {source!r} mixes folders with other files")
    if suffixes == {".tar"}:
        return Source("tar", files, f"{len(files)} WebDataset tar shards")
    if suffixes == {".parquet"}:
        return _detect_parquet(files, url_column)
    if suffixes <= URL_LIST_EXTENSIONS:
        for path in files:
            _check_url_column(path, url_column)
        return Source("urls", files, f"URL list ({len(files)} files)", url_column=url_column)
    raise SourceError(
        f"source {source!r} mixes file kinds {sorted(suffixes)}; give one kind: images, "
        ".txt/.csv/.tsv/.jsonl URL lists, .tar or .parquet"
    )


def _walk_images(root: Path) -> tuple[list[Path], int]:
    found: list[Path] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
            else:
                skipped += 1
    # One order for every walk: by path, whatever order the file system lists entries in.
    found.sort()
    return found, skipped


def _detect_parquet(files: list[Path], url_column: str) -> Source:
    try:
        schema = pq.read_schema(files[0])
    except Exception as error:
        raise SourceError(f"cannot read Parquet file {files[0]}: {error}") from None
    image_column = next(
        (c for c in IMAGE_COLUMNS if c in schema.names and holds_image_bytes(schema.field(c).type)),
        None,
    )
    for path in files[1:]:
        try:
            other = pq.read_schema(path)
        except Exception as error:
            raise SourceError(f"cannot read Parquet file {path}: {error}") from None
        if image_column and image_column not in other.names:
            raise SourceError(f"{path} lacks the image column {image_column!r} of {files[0]}")
    if image_column:
        return Source(
            "parquet", files, f"{len(files)} Parquet image shards", image_column=image_column
        )
    if url_column in schema.names:
        description = f"URL list ({len(files)} Parquet files)"
        return Source("urls", files, description, url_column=url_column)
    raise SourceError(
        f"Parquet source {files[0]} has neither an image column ({', '.join(IMAGE_COLUMNS)}) "
        f"nor a {url_column!r} column; columns: {schema.names}"
    )


def holds_image_bytes(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return dtype.get_field_index("bytes") >= 0
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


# -- URL lists ----------------------------------------------------------------------------------


def _url_batches(path: Path) -> Iterator[pa.RecordBatch]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            # Every column as text: metadata is passed through, never reinterpreted.
            names = pacsv.open_csv(path, parse_options=parse).schema.names
            convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
            yield from pacsv.open_csv(path, parse_options=parse, convert_options=convert)
        elif suffix == ".jsonl":
            # Streamed; the columns are inferred from the first block (16 MiB of lines).
            yield from pajson.open_json(path, read_options=pajson.ReadOptions(block_size=16 << 20))
        else:
            yield from pq.ParquetFile(path).iter_batches(batch_size=8192)
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceError(f"cannot read URL list {path}: {error}") from None


def _txt_urls(path: Path) -> Iterator[str]:
    """A .txt list's URLs, one a line, blank lines and # comments skipped. Read as plain text:
    building Arrow arrays imports pandas, half a second of a driver's start-up."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
    except OSError as error:
        raise SourceError(f"cannot read URL list {path}: {error}") from None


def _url_rows(path: Path, url_column: str) -> Iterator[dict[str, Any]]:
    """A URL list's rows in file order, each a dict of its columns."""
    if path.suffix.lower() == ".txt":
        if url_column != "url":
            raise SourceError(f"URL list {path} has no {url_column!r} column")
        yield from ({"url": url} for url in _txt_urls(path))
        return
    for batch in _url_batches(path):
        if url_column not in batch.schema.names:
            raise SourceError(f"URL list {path} has no {url_column!r} column")
        yield from batch.to_pylist()


def _check_url_column(path: Path, url_column: str) -> None:
    if path.suffix.lower() == ".txt":
        return
    for batch in _url_batches(path):
        if url_column not in batch.schema.names:
            raise SourceError(
                f"URL list {path} has no {url_column!r} column; columns: {batch.schema.names}"
            )
        return


def _count_url_rows(path: Path, url_column: str) -> int:
    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix.lower() == ".txt":
        return sum(1 for _ in _txt_urls(path))
    return sum(batch.num_rows for batch in _url_batches(path))


def _url_parts(files: list[Path], url_column: str, shard_size: int) -> Iterator[SourcePart]:
    index = 0
    items: list[tuple[str, str]] = []
    for path in files:
        for row in _url_rows(path, url_column):
            url = row.pop(url_column)
            items.append((str(url).strip() if url is not None else "", metadata_json(row)))
            if len(items) == shard_size:
                yield SourcePart(index=index, kind="urls", items=tuple(items))
                index += 1
                items = []
    if items:
        yield SourcePart(index=index, kind="urls", items=tuple(items))


def metadata_json(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if v is not None}, default=str)


# -- local files --------------------------------------------------------------------------------


def _file_parts(
    files: list[Path], shard_size: int, boundary: tuple[str, ...]
) -> Iterator[SourcePart]:
    for index, start in enumerate(range(0, len(files), shard_size)):
        # Absolute but never resolved: an item's uri is the path the source lists.
        paths = tuple(str(p.absolute()) for p in files[start : start + shard_size])
        yield SourcePart(index=index, kind="files", items=paths, boundary=boundary)


# -- Parquet image shards -----------------------------------------------------------------------


def _parquet_parts(
    files: list[Path], image_column: str | None, shard_size: int
) -> Iterator[SourcePart]:
    index = 0
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as error:
            raise SourceError(f"cannot read Parquet file {path}: {error}") from None
        groups: list[int] = []
        rows = 0
        for group in range(meta.num_row_groups):
            groups.append(group)
            rows += meta.row_group(group).num_rows
            if rows >= shard_size:
                yield SourcePart(
                    index,
                    "parquet",
                    path=str(path),
                    row_groups=tuple(groups),
                    image_column=image_column,
                )
                index += 1
                groups, rows = [], 0
        if groups:
            yield SourcePart(
                index,
                "parquet",
                path=str(path),
                row_groups=tuple(groups),
                image_column=image_column,
            )
            index += 1
