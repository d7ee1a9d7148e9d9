"""Reads by position and by key over small Parquet files with many row groups."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.browse.tables import KeyPrefixes, OpenFiles, RowRanges, SortedFile


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """1,000 rows sorted by a hex key, some keys three times, in row groups of 64."""
    keys = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(900))
    keys = sorted(keys + keys[100:150] * 2)
    table = pa.table({"image_id": keys, "n": list(range(len(keys)))})
    path = tmp_path_factory.mktemp("t") / "keyed.parquet"
    pq.write_table(table, path, row_group_size=64)
    bare = path.with_name("bare.parquet")
    pq.write_table(table, bare, row_group_size=64, write_statistics=False)
    return keys, path, bare


def test_ranges_cross_row_groups(keyed):
    keys, path, _ = keyed
    ranges = RowRanges(path, "image_id")
    assert ranges.read(0, 1000) == keys
    assert ranges.read(60, 70) == keys[60:70]
    assert ranges.read(63, 64) == [keys[63]] and ranges.read(5, 5) == []


@pytest.mark.parametrize("which", [1, 2])
def test_sorted_file_finds_every_row_of_a_key(keyed, which):
    keys, *paths = keyed
    found = SortedFile(paths[which - 1], "image_id")
    for at in (0, 63, 64, 120, 999):
        rows = found.find(keys[at], ["n"])
        assert [r["n"] for r in rows] == [i for i, k in enumerate(keys) if k == keys[at]]
    assert found.find("0" * 64, ["n"]) == [] and found.find("g", ["n"]) == []


def test_prefixes_never_miss_a_key(keyed):
    keys, path, _ = keyed
    prefixes = KeyPrefixes(path, "image_id")
    assert all(prefixes.may_hold(k) for k in keys)
    assert not prefixes.may_hold("0" * 64) and not prefixes.may_hold("not hex")


def test_open_files_are_reused_and_bounded(keyed):
    _, path, bare = keyed
    files = OpenFiles(limit=1)
    first = files.sorted(path, "image_id")
    assert files.sorted(path, "image_id") is first
    files.sorted(bare, "image_id")
    assert files.sorted(path, "image_id") is not first
