"""curate/core/storage.py on Arrow's in-memory filesystem (`mock://`), which the object store
code reaches through the same `pyarrow.fs` calls as S3: uploads on publish, in-place Parquet
reads, fetches that notice a changed object, listings, deletes and the per-process cache
budget. The S3 server itself is exercised in tests/integration/test_object_store.py."""

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.core import atomic, storage
from curate.core.shards import write_shard
from curate.settings import Settings


@pytest.fixture
def store(tmp_path) -> storage.Store:
    """A fresh remote root (its own bucket name: the in-memory filesystem lives per URI)."""
    uri = f"mock://bucket/{uuid.uuid4().hex}"
    return storage.register(storage.Store.open(uri, tmp_path / "cache", cache_gb=1))


def objects(store: storage.Store) -> dict[str, bytes]:
    filesystem, base = storage._filesystem(store.uri)
    infos = filesystem.get_file_info(storage.fs.FileSelector(base, recursive=True))
    out = {}
    for info in infos:
        if info.type == storage.fs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                out[info.path[len(base) + 1 :]] = stream.read()
    return out


def test_a_folder_is_its_own_store(tmp_path):
    for root in (tmp_path / "data", f"file://{tmp_path / 'data'}"):
        posix = storage.Store.open(root)
        assert not posix.remote and posix.root == tmp_path / "data"
        assert posix.local == posix.root
    path = tmp_path / "data" / "a.json"
    atomic.write_json(path, {"a": 1})
    assert storage.fetch(path) == path and storage.exists(path)
    assert storage.size(path) == path.stat().st_size
    assert not storage.is_remote(path)


def test_a_remote_root_is_mirrored_outside_its_node_cache(tmp_path, store):
    assert store.remote and store.root.is_relative_to(tmp_path / "cache")
    assert not store.local.is_relative_to(store.root)  # thumbnails are never uploaded
    settings = Settings(data_root=store.uri, cache_dir=tmp_path / "cache", catalog_path=tmp_path)
    assert settings.root == store.root and settings.thumb_dir.is_relative_to(store.local)
    with pytest.raises(storage.StorageError, match="CURATE_CATALOG_PATH"):
        _ = Settings(data_root=store.uri, cache_dir=tmp_path / "cache").catalog_file


def test_published_files_are_uploaded_whole_and_read_back_from_the_store(store):
    shard = store.root / "jobs" / "j" / "embed" / "part-000000.parquet"
    table = pa.table({"image_id": ["a", "b", "c"], "n": [1, 2, 3]})
    info = write_shard(table, shard)
    stored = objects(store)
    assert set(stored) == {"jobs/j/embed/part-000000.parquet"}
    assert len(stored["jobs/j/embed/part-000000.parquet"]) == info.bytes
    assert storage.sha256(shard) == info.checksum
    shard.unlink()  # no local copy: Parquet is read in place, from the store
    assert storage.read_table(shard, ["image_id"]).column(0).to_pylist() == ["a", "b", "c"]
    assert storage.parquet_file(shard).metadata.num_rows == 3
    assert storage.dataset([shard]).count_rows() == 3
    assert not shard.exists()
    with pytest.raises(FileNotFoundError):
        storage.read_table(shard.with_name("part-000001.parquet"))


def test_fetch_downloads_and_notices_a_changed_object(store):
    path = store.root / "cluster" / "centroids.npy"
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.eye(2, dtype=np.float32))
    os.remove(path)
    assert np.array_equal(np.load(storage.fetch(path)), np.eye(2))
    filesystem, _ = storage._filesystem(store.uri)
    with filesystem.open_output_stream(store.key(path)) as out:  # replaced behind our back
        np.save(out, np.zeros((3, 3), np.float32))
    assert np.load(storage.fetch(path)).shape == (3, 3)
    filesystem.delete_file(store.key(path))
    assert not storage.exists(path) and storage.size(path) is None
    with pytest.raises(FileNotFoundError):
        storage.fetch(path)


def test_listing_deleting_and_portable_paths(store):
    for name in ("ingest-1/complete.json", "embed-1/complete.json", "embed-2/complete.json"):
        atomic.write_json(store.root / "seed_sets" / "s" / name, {"name": name})
    found = storage.listing(store.root / "seed_sets" / "s", "embed-*/complete.json")
    assert [p.parent.name for p in found] == ["embed-1", "embed-2"]
    assert storage.read_json(found[0]) == {"name": "embed-1/complete.json"}
    assert storage.folder_exists(store.root / "seed_sets")
    storage.remove_tree(store.root / "seed_sets" / "s")
    assert objects(store) == {} and not (store.root / "seed_sets" / "s").exists()
    recorded = storage.portable(store.root / "a" / "b.parquet", store.root)
    assert recorded == "a/b.parquet"
    assert storage.resolve(recorded, Path("/elsewhere")) == Path("/elsewhere/a/b.parquet")
    assert storage.resolve("/abs/c.parquet", store.root) == Path("/abs/c.parquet")


def test_a_process_keeps_what_it_fetched_under_its_budget(tmp_path):
    small = storage.Store.open(f"mock://bucket/{uuid.uuid4().hex}", tmp_path, cache_gb=2.5e-9)
    storage.register(small)  # 2.5e-9 GiB: two 1-byte-ish files at most
    paths = [small.root / f"f{i}.bin" for i in range(3)]
    for path in paths:
        atomic.write_bytes(path, b"x")
        storage.fetch(path)
    assert [p.exists() for p in paths] == [False, True, True]
    assert storage.fetch(paths[0]).read_bytes() == b"x"  # evicted, fetched again
