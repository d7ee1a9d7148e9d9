"""Reading the items of a local part, in the worker that ingests it: a folder's files (confined
to the source's roots), a WebDataset tar's samples, a Parquet shard's rows. The driver's side,
finding a source and cutting it into parts, is curate/stages/ingest/sources.py."""

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.stages.ingest.confine import read_confined
from curate.stages.ingest.decode import Rejected
from curate.stages.ingest.sources import (
    TAR_IMAGE_EXTENSIONS,
    SourcePart,
    holds_image_bytes,
    metadata_json,
)
from schemas.reasons import Reason

Item = tuple[str, str, bytes | Rejected]  # uri, metadata JSON, bytes or why there are none


def read_local_items(part: SourcePart) -> Iterator[Item]:
    """The items of a files, tar or parquet part, in source order."""
    if part.kind == "files":
        for path in part.items:
            yield path, "{}", read_confined(path, part.boundary)
    elif part.kind == "tar":
        yield from _tar_items(part.path or "")
    elif part.kind == "parquet":
        yield from _parquet_items(part)
    else:
        raise ValueError(f"part kind {part.kind!r} is not local")


def _split_member(name: str) -> tuple[str, str]:
    # WebDataset: the key is the member path up to the first dot of its base name.
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_sample(tar_path: str, key: str, members: dict[str, bytes]) -> Item:
    metadata: dict[str, Any] = {"key": key}
    if "json" in members:
        try:
            value = json.loads(members["json"])
            metadata.update(value if isinstance(value, dict) else {"json": value})
        except ValueError:
            metadata["json"] = members["json"].decode("utf-8", "replace")
    for ext in ("txt", "cls"):
        if ext in members:
            metadata[ext] = members[ext].decode("utf-8", "replace").strip()
    image_ext = next((e for e in TAR_IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        uri = f"{tar_path}#{key}"
        rejected = Rejected(Reason.NOT_AN_IMAGE, f"sample has no image member: {sorted(members)}")
        return uri, json.dumps(metadata), rejected
    return f"{tar_path}#{key}.{image_ext}", json.dumps(metadata, default=str), members[image_ext]


def _tar_items(tar_path: str) -> Iterator[Item]:
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        # Streaming mode: a shard is read once, front to back, whatever its size.
        with tarfile.open(tar_path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if key is not None and member_key != key:
                    yield _tar_sample(tar_path, key, members)
                    members = {}
                key = member_key
                handle = tar.extractfile(member)
                members[ext] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        if key is not None:
            yield _tar_sample(tar_path, key, members)
            key = None
        detail = f"tar unreadable past this point: {type(error).__name__}: {error}"
        yield f"{tar_path}#", "{}", Rejected(Reason.READ_ERROR, detail)
    if key is not None:
        yield _tar_sample(tar_path, key, members)


def _parquet_items(part: SourcePart) -> Iterator[Item]:
    assert part.path and part.image_column
    try:
        parquet = pq.ParquetFile(part.path)
        table = parquet.read_row_groups(list(part.row_groups))
    except (pa.ArrowException, OSError) as error:
        # A damaged shard loses its rows, not the job: one error row stands for the part.
        groups = ",".join(map(str, part.row_groups))
        detail = f"row groups {groups} unreadable: {type(error).__name__}: {error}"
        yield f"{part.path}#row-groups={groups}", "{}", Rejected(Reason.READ_ERROR, detail)
        return
    first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(part.row_groups[0]))
    binary_columns = {
        f.name for f in table.schema if holds_image_bytes(f.type) or f.name == part.image_column
    }
    for offset, row in enumerate(table.to_pylist()):
        value = row.get(part.image_column)
        data = value.get("bytes") if isinstance(value, dict) else value
        struct_path = value.get("path") if isinstance(value, dict) else None
        uri = row.get("url") or struct_path or f"{part.path}#{first_row + offset}"
        metadata = metadata_json({k: v for k, v in row.items() if k not in binary_columns})
        if data is None:
            yield str(uri), metadata, Rejected(Reason.EMPTY, "image bytes are null")
        else:
            yield str(uri), metadata, data
