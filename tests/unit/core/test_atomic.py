"""curate.core.atomic: a file appears whole or not at all, and a failed write leaves nothing."""

import json

import pytest

from curate.core import atomic


def test_writes_appear_whole_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "manifest.json"
    atomic.write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().startswith('{\n  "a"'), "sorted keys: equal values, equal files"
    atomic.write_text(tmp_path / "card.md", "# card\n")
    atomic.write_bytes(tmp_path / "blob", b"\x00\x01")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "index.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".index.npz.")
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_temporary_names_never_collide(tmp_path):
    names = {atomic.temporary_name(tmp_path / "part-000000.parquet") for _ in range(100)}
    assert len(names) == 100


def test_leftovers_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    stage = tmp_path / "dedup"
    (stage / "errors").mkdir(parents=True)
    keep = [stage / "part-000000.parquet", stage / ".seed_sets.json", stage / "errors" / "x.tmp"]
    for path in keep:
        path.write_bytes(b"kept")
    left = [atomic.temporary_name(stage / "part-000004.parquet")]
    left.append(atomic.temporary_name(stage / "errors" / "part-000004.parquet"))
    for path in left:
        path.write_bytes(b"half")
    assert atomic.remove_leftovers(stage) == 2
    assert not any(path.exists() for path in left) and all(path.exists() for path in keep)
