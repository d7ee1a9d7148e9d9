"""Where a data root's files live: a POSIX folder, or an object store mirrored on each node.

`CURATE_DATA_ROOT` is a folder (every node sees the same files: one machine, or a shared mount)
or a `pyarrow.fs` URI such as `s3://bucket/prefix` (endpoint and credentials from the usual
`AWS_*` environment variables). An object store has no rename and no local files, while our
readers (Parquet, numpy, FAISS, DuckDB) want local files, so a remote root is mirrored: every
path in the code is a local path under `Store.root`, the node's mirror of the store, and

- a file published there (`curate.core.atomic.publish`, which every shard and artefact write
  goes through, calls `upload`) is uploaded to the object under the same relative key. One
  PUT makes an object appear whole or not at all, and the catalog, not a listing, says which
  shards exist, so publication stays atomic;
- Parquet is read in place (`parquet_file`, `read_table`, `dataset`): ranged reads of the
  object, so a column of image ids never drags the image bytes beside it over the network;
- any other file (numpy, FAISS, JSON) is read from the local copy `fetch(path)` returns:
  downloaded when missing or when the store's object differs (size or modification time),
  kept in the mirror after. Each process keeps at
  most `CURATE_CACHE_GB` of what it fetched and evicts the least recently used files beyond it.

A POSIX root is its own mirror: `fetch` returns the path, `publish` is a rename, nothing else
happens. No node needs a shared mount with a remote root: the driver ships its `Store` to every
worker (`register`, called by the executor), and a worker fetches what it reads.
"""

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

if TYPE_CHECKING:
    import pyarrow.dataset as ds

_GIB = 1 << 30
_CHUNK = 8 << 20


class StorageError(RuntimeError):
    """A data root that cannot be used, or a stored file that is not there."""


@dataclass(frozen=True)
class Store:
    """A data root: `uri` (None for a POSIX folder), `root` (the local folder of its files) and
    `local`, where a node keeps what is never stored (thumbnails): under `root` for a POSIX
    root, beside the mirror for a remote one, so it is never uploaded."""

    root: Path
    uri: str | None = None
    cache_bytes: int = 64 * _GIB
    local_root: Path | None = None

    @property
    def local(self) -> Path:
        return self.local_root or self.root

    @classmethod
    def open(cls, data_root: str | Path, cache_dir: Path | None = None, cache_gb: float = 64):
        """The store of a `CURATE_DATA_ROOT` value; a URI is mirrored under `cache_dir`."""
        text = str(data_root)
        if text.startswith("file://"):
            return cls(root=Path(text.removeprefix("file://")))
        if "://" not in text:
            return cls(root=Path(text))
        scheme, _, rest = text.partition("://")
        rest = rest.strip("/")
        if not rest or ".." in rest.split("/"):
            raise StorageError(f"CURATE_DATA_ROOT={text}: name a bucket (and a prefix)")
        try:
            _filesystem(f"{scheme}://{rest}")
        except (ValueError, OSError) as error:
            raise StorageError(f"CURATE_DATA_ROOT={text}: {error}") from error
        base = cache_dir or Path(tempfile.gettempdir()) / f"lvd-curate-{os.getuid()}" / "store"
        base = Path(base).absolute()
        return cls(
            root=base / scheme / rest,
            uri=f"{scheme}://{rest}",
            cache_bytes=int(cache_gb * _GIB),
            local_root=base / "node" / scheme / rest,
        )

    @property
    def remote(self) -> bool:
        return self.uri is not None

    def key(self, path: Path) -> str:
        """The store's name of a local path under `root` (the filesystem's path of the object)."""
        relative = Path(path).absolute().relative_to(self.root)
        _, base = _filesystem(self.uri)
        return f"{base}/{relative.as_posix()}" if relative.parts else base


@cache
def _filesystem(uri: str) -> tuple[fs.FileSystem, str]:
    return fs.FileSystem.from_uri(uri)


# -- the remote stores this process knows ---------------------------------------------------------

_stores: dict[Path, Store] = {}
_fetched: OrderedDict[Path, int] = OrderedDict()  # what this process downloaded, oldest first
_lock = threading.Lock()


def register(store: Store) -> Store:
    """Make a store's files reachable from this process (a no-op for a POSIX root)."""
    if store.remote:
        _stores[store.root] = store
    return store


def register_all(stores: Iterable[Store]) -> None:
    """Register what `registered()` gave in another process (a worker gets the driver's)."""
    for store in stores:
        register(store)


def _remote_of(path: Path | str) -> tuple[Store, str] | None:
    if not _stores:
        return None
    path = Path(path).absolute()
    for root, store in _stores.items():
        if path.is_relative_to(root):
            return store, store.key(path)
    return None


def is_remote(path: Path | str) -> bool:
    """Whether `path` lies in the mirror of an object store root."""
    return _remote_of(path) is not None


def _stat(store: Store, key: str) -> fs.FileInfo:
    return _filesystem(store.uri)[0].get_file_info(key)


def _same(local: Path, info: fs.FileInfo) -> bool:
    try:
        stat = local.stat()
    except FileNotFoundError:
        return False
    return stat.st_size == info.size and int(stat.st_mtime) == int(info.mtime.timestamp())


# -- reading --------------------------------------------------------------------------------------


def fetch(path: Path | str) -> Path:
    """The local copy of a stored file: the path itself on a POSIX root; on a remote root the
    mirror's copy, downloaded first when missing or stale. FileNotFoundError if not stored."""
    path = Path(path)
    remote = _remote_of(path)
    if remote is None:
        return path
    store, key = remote
    info = _stat(store, key)
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"{store.uri}: no object {key}")
    if not _same(path, info):
        _download(store, key, path, info)
    _remember(store, path, info.size)
    return path


def fetch_all(paths: Iterable[Path | str]) -> list[Path]:
    return [fetch(p) for p in paths]


def portable(path: Path | str, root: Path) -> str:
    """How a manifest records a stored path: relative to the data root when under it, so that
    a node whose mirror lies elsewhere reads it (`resolve` turns it back)."""
    path = Path(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def resolve(recorded: str, root: Path) -> Path:
    """A path as `portable` recorded it, under this process's root (an absolute one, as older
    manifests recorded them, stays as it is)."""
    return root / recorded


def read_json(path: Path | str) -> Any:
    return json.loads(fetch(path).read_text())


def _source(path: Path | str) -> tuple[str, fs.FileSystem | None]:
    remote = _remote_of(path)
    if remote is None:
        return str(path), None
    store, key = remote
    return key, _filesystem(store.uri)[0]


def parquet_file(path: Path | str) -> pq.ParquetFile:
    """A Parquet file read in place: on a remote root, ranged reads of the store's object, so
    only the footer and the row groups and columns asked for travel (a column of image ids,
    not the image bytes beside it). Parquet is never fetched whole."""
    name, filesystem = _source(path)
    if filesystem is None:
        return pq.ParquetFile(name)
    return pq.ParquetFile(filesystem.open_input_file(name))  # FileNotFoundError if not stored


def read_table(
    paths: Path | str | Sequence[Path | str],
    columns: list[str] | None = None,
    filters: list | None = None,
) -> pa.Table:
    """`pyarrow.parquet.read_table` of one stored Parquet file or several, read in place."""
    several = not isinstance(paths, str | Path)
    sources = [_source(p) for p in (paths if several else [paths])]
    files = [name for name, _ in sources]
    return pq.read_table(
        files if several else files[0],
        columns=columns,
        filters=filters,
        filesystem=_one_filesystem(sources),
    )


def _one_filesystem(sources: list[tuple[str, fs.FileSystem | None]]) -> fs.FileSystem | None:
    if len({id(filesystem) for _, filesystem in sources}) > 1:
        raise StorageError("one read over files of different data roots")
    return sources[0][1] if sources else None


def open_input_file(path: Path | str) -> pa.NativeFile:
    """A stored file opened for random access in place (ranged reads on a remote root): for
    readers that take a few pieces of a large file, such as one bucket's batches of an Arrow
    IPC file."""
    name, filesystem = _source(path)
    if filesystem is None:
        return pa.OSFile(name, "rb")
    return filesystem.open_input_file(name)


def dataset(paths: Sequence[Path | str]) -> "ds.Dataset":
    """Parquet files as one pyarrow dataset, read in place: what DuckDB scans (registered as a
    view) when a query wants a column or two of shards too big to fetch."""
    # Imported here: pyarrow.dataset imports pandas (half a second of start-up), which the
    # processes that never scan a dataset (an ingest part's workers) need not pay.
    import pyarrow.dataset as ds

    sources = [_source(p) for p in paths]
    return ds.dataset(
        [name for name, _ in sources], format="parquet", filesystem=_one_filesystem(sources)
    )


def _download(store: Store, key: str, path: Path, info: fs.FileInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with _filesystem(store.uri)[0].open_input_stream(key) as source, open(tmp, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
        stamp = info.mtime.timestamp()
        os.utime(tmp, (stamp, stamp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remember(store: Store, path: Path, size: int) -> None:
    """Keep this process's fetched files under the store's budget, least recently used out."""
    with _lock:
        _fetched[path] = size
        _fetched.move_to_end(path)
        total = sum(_fetched.values())
        while total > store.cache_bytes and len(_fetched) > 1:
            old, old_size = _fetched.popitem(last=False)
            old.unlink(missing_ok=True)
            total -= old_size


def exists(path: Path | str) -> bool:
    """Whether a file is stored (on a remote root: the object exists, whatever the mirror has)."""
    remote = _remote_of(path)
    if remote is None:
        return Path(path).is_file()
    return _stat(*remote).type == fs.FileType.File


def size(path: Path | str) -> int | None:
    """A stored file's size in bytes, None when it is not stored."""
    remote = _remote_of(path)
    if remote is None:
        try:
            return Path(path).stat().st_size
        except FileNotFoundError:
            return None
    info = _stat(*remote)
    return info.size if info.type == fs.FileType.File else None


def version(path: Path | str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a stored file, None when it is not stored: what a
    cache built from the file is keyed by."""
    remote = _remote_of(path)
    if remote is None:
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            return None
        return stat.st_size, stat.st_mtime_ns
    info = _stat(*remote)
    if info.type != fs.FileType.File:
        return None
    return info.size, info.mtime_ns


def folder_exists(folder: Path | str) -> bool:
    """Whether anything is stored under `folder`."""
    remote = _remote_of(folder)
    if remote is None:
        return Path(folder).is_dir()
    return _stat(*remote).type == fs.FileType.Directory


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """The sha256 of a local file (a shard just written, before it is published)."""
    with open(path, "rb") as handle:
        return _sha256(handle)


def sha256(path: Path | str) -> str:
    """The sha256 of a stored file, streamed (from the store itself on a remote root)."""
    remote = _remote_of(path)
    if remote is None:
        return file_sha256(path)
    store, key = remote
    with _filesystem(store.uri)[0].open_input_stream(key) as source:
        return _sha256(source)


def listing(folder: Path | str, pattern: str = "*") -> list[Path]:
    """The stored files under `folder` (recursively) whose path relative to it matches `pattern`
    (fnmatch: `*` crosses folders), sorted: for the caches found by name (seed-set embeddings)."""
    folder = Path(folder)
    remote = _remote_of(folder)
    if remote is None:
        found = (p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else ()
        return sorted(
            p for p in found if fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern)
        )
    store, key = remote
    selector = fs.FileSelector(key, recursive=True, allow_not_found=True)
    infos = _filesystem(store.uri)[0].get_file_info(selector)
    names = (info.path[len(key) + 1 :] for info in infos if info.type == fs.FileType.File)
    return sorted(folder / name for name in names if fnmatch.fnmatch(name, pattern))


# -- writing --------------------------------------------------------------------------------------


def upload(path: Path) -> None:
    """On a remote root, upload a file just published in the mirror under its key (called by
    `curate.core.atomic.publish`); nothing on a POSIX root.

    The local rename comes first, so this node reads its own output without a download; the
    upload is what makes the file exist for every other node and for the catalog's commit."""
    remote = _remote_of(path)
    if remote is None:
        return
    store, key = remote
    filesystem = _filesystem(store.uri)[0]
    try:
        out = filesystem.open_output_stream(key)
    except FileNotFoundError:
        # A filesystem with real folders (not S3's flat keys) wants the parent first.
        filesystem.create_dir(key.rsplit("/", 1)[0], recursive=True)
        out = filesystem.open_output_stream(key)
    with open(path, "rb") as source, out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
    # The mirror's copy takes the object's time, so `fetch` on this node knows it is current.
    stamp = _stat(store, key).mtime.timestamp()
    os.utime(path, (stamp, stamp))


def remove_tree(folder: Path | str, missing_ok: bool = True) -> None:
    """Delete a folder's stored files: the mirror's and, on a remote root, the store's. With
    `missing_ok=False` an error deleting the local folder (gone, or not deletable) is raised."""
    folder = Path(folder)
    remote = _remote_of(folder)
    if missing_ok or remote is not None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        shutil.rmtree(folder)
    if remote is not None:
        store, key = remote
        filesystem = _filesystem(store.uri)[0]
        if filesystem.get_file_info(key).type == fs.FileType.Directory:
            filesystem.delete_dir(key)


def remove(path: Path | str) -> None:
    """Delete one stored file (mirror and store)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    remote = _remote_of(path)
    if remote is not None and _stat(*remote).type == fs.FileType.File:
        _filesystem(remote[0].uri)[0].delete_file(remote[1])


def registered() -> tuple[Store, ...]:
    """The object store roots registered in this process (the executor ships them to workers)."""
    return tuple(_stores.values())
