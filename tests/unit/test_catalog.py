import subprocess
import sys
import time

import pyarrow as pa
import pytest

from curate.catalog import Catalog, JobConflict, JobNotFound
from curate.core.shards import PartResult, write_shard
from schemas.job import parse_job_spec
from schemas.shards import ERRORS, INGEST


def ingest_rows(part: int, ids: list[str]) -> pa.Table:
    rows = [
        {
            "image_id": image_id,
            "uri": f"file://{part}/{item}",
            "image": {"bytes": b"x", "path": f"{image_id}.jpg"},
            "width": 64,
            "height": 64,
            "format": "JPEG",
            "mode": "RGB",
            "resized": False,
            "part": part,
            "item": item,
            "metadata": "{}",
        }
        for item, image_id in enumerate(ids)
    ]
    return pa.Table.from_pylist(rows, schema=INGEST)


def commit(catalog: Catalog, root, part: int, ids: list[str], reasons: dict[str, int]):
    errors = pa.Table.from_pylist(
        [
            {
                "uri": f"u{part}-{n}",
                "stage": "ingest",
                "reason": reason,
                "detail": "",
                "part": part,
                "item": 100 + n,
                "metadata": "{}",
            }
            for reason, count in reasons.items()
            for n in range(count)
        ],
        schema=ERRORS,
    )
    shards = {
        "data": write_shard(ingest_rows(part, ids), root / f"jobs/j/ingest/part-{part}.parquet"),
        "errors": write_shard(errors, root / f"jobs/j/ingest/errors/part-{part}.parquet"),
    }
    result = PartResult(part, len(ids) + sum(reasons.values()), len(ids), shards, reasons, 0.1)
    catalog.commit_part("j", "ingest", result)
    return result


def test_job_lifecycle_report_and_views(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb", tmp_path)
    spec = parse_job_spec({"source": "somewhere", "job_id": "j"})
    assert catalog.open_job(spec) is False
    assert catalog.open_job(spec) is True, "same spec resumes"
    with pytest.raises(JobConflict, match="different spec"):
        catalog.open_job(parse_job_spec({"source": "elsewhere", "job_id": "j"}))

    catalog.start_stage("j", "ingest", 2)
    commit(catalog, tmp_path, 0, ["a", "b", "a"], {"timeout": 2})
    second = commit(catalog, tmp_path, 1, ["c", "b"], {"timeout": 1, "http_status": 1})
    assert catalog.committed_parts("j", "ingest") == {0, 1}
    with pytest.raises(Exception, match="(?i)constraint|duplicate"):
        catalog.commit_part("j", "ingest", second)
    catalog.finish_stage("j", "ingest", "done", 1.5, {"images": 3})
    catalog.refresh_views("j")

    report = catalog.job_report("j")
    (stage,) = report["stages"]
    assert stage["parts_done"] == 2 and stage["parts_total"] == 2
    assert (stage["rows_in"], stage["rows_out"], stage["errors"]) == (9, 5, 4)
    assert stage["errors_by_reason"] == {"timeout": 3, "http_status": 1}
    assert stage["metrics"] == {"images": 3}

    _, rows = catalog.query('SELECT image_id, part, item FROM "j".ingest ORDER BY image_id')
    assert rows == [("a", 0, 0), ("b", 0, 1), ("c", 1, 0)], "first occurrence in source order"
    _, dups = catalog.query(
        'SELECT image_id, uri, duplicate_of FROM "j".ingest_duplicates ORDER BY uri'
    )
    assert dups == [("a", "file://0/2", "file://0/0"), ("b", "file://1/1", "file://0/1")]
    _, errors = catalog.query('SELECT count(*) FROM "j".ingest_errors')
    assert errors == [(4,)]
    assert [j["job_id"] for j in catalog.list_jobs()] == ["j"]
    with pytest.raises(JobNotFound):
        catalog.job_report("nope")


def test_unregistered_shards_are_not_in_the_views(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb", tmp_path)
    catalog.open_job(parse_job_spec({"source": "s", "job_id": "j"}))
    commit(catalog, tmp_path, 0, ["a"], {})
    # A shard renamed into place by a run that died before registering it.
    write_shard(ingest_rows(1, ["orphan"]), tmp_path / "jobs/j/ingest/part-1.parquet")
    catalog.refresh_views("j")
    _, rows = catalog.query('SELECT image_id FROM "j".ingest')
    assert rows == [("a",)]


def commit_stage(catalog: Catalog, root, stage: str, part: int) -> None:
    """A part of a stage after ingest, with one shard of ids (the catalog reads no columns)."""
    table = pa.table({"image_id": [f"{stage}-{part}"]})
    shard = write_shard(table, root / f"jobs/j/{stage}/part-{part}.parquet")
    catalog.commit_part("j", stage, PartResult(part, 1, 1, {"data": shard}, {"x": 1}))


def test_invalidating_parts_forgets_them_and_resets_the_later_stages(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb", tmp_path)
    catalog.open_job(parse_job_spec({"source": "s", "job_id": "j"}))
    catalog.start_stage("j", "ingest", 3)
    for part in range(3):
        commit(catalog, tmp_path, part, [f"i{part}"], {"timeout": 1})
    catalog.finish_stage("j", "ingest", "done", 1.0, {"images": 3})
    for stage in ("dedup_features", "dedup"):
        catalog.start_stage("j", stage, 2)
        for part in range(2):
            commit_stage(catalog, tmp_path, stage, part)
        catalog.finish_stage("j", stage, "done", 1.0)
    catalog.refresh_views("j")
    catalog.set_job_status("j", "done")
    registered = catalog.registered_shards("j")
    assert len(registered) == 3 * 2 + 2 + 2
    assert registered[0] == {
        "stage": "dedup",
        "kind": "data",
        "part": 0,
        "path": "jobs/j/dedup/part-0.parquet",
        "rows": 1,
        "bytes": registered[0]["bytes"],
        "checksum": registered[0]["checksum"],
    }

    catalog.invalidate_parts("j", {"ingest": [1]}, ["dedup_features", "dedup"], "part 1 gone")

    assert catalog.committed_parts("j", "ingest") == {0, 2}
    assert [s.index for s in catalog.shards("j", "ingest")] == [0, 2]
    assert [s.index for s in catalog.shards("j", "ingest", "errors")] == [0, 2]
    report = catalog.job_report("j")
    assert (report["status"], report["message"]) == ("failed", "part 1 gone")
    (ingest,) = report["stages"]  # the later stages are gone, as if never run
    assert (ingest["status"], ingest["message"]) == ("failed", "part 1 gone")
    assert ingest["errors_by_reason"] == {"timeout": 2} and ingest["metrics"] == {"images": 3}
    assert {s["stage"] for s in catalog.registered_shards("j")} == {"ingest"}
    assert catalog.committed_parts("j", "dedup") == set()
    _, views = catalog.query(
        "SELECT view_name FROM duckdb_views() WHERE schema_name = 'j' ORDER BY 1"
    )
    assert [v for (v,) in views] == ["ingest", "ingest_duplicates", "ingest_errors"]
    # The part commits again, as a re-run does.
    commit(catalog, tmp_path, 1, ["i1"], {"timeout": 1})
    assert catalog.committed_parts("j", "ingest") == {0, 1, 2}


def test_a_second_process_waits_for_the_lock(tmp_path):
    path = tmp_path / "catalog.duckdb"
    catalog = Catalog(path, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time\n"
            f"con = duckdb.connect({str(path)!r})\n"
            "print('held', flush=True)\n"
            "time.sleep(1.5)\n"
            "con.close()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        catalog.open_job(parse_job_spec({"source": "s", "job_id": "waited"}))
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5, "the call should have met the other process's lock"
    assert catalog.job_spec("waited").source == "s"


def test_lock_held_too_long_is_a_clear_error(tmp_path):
    path = tmp_path / "catalog.duckdb"
    Catalog(path, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time\ncon = duckdb.connect({str(path)!r})\nprint('held', flush=True)\n"
            "time.sleep(5)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        impatient = Catalog.__new__(Catalog)
        impatient.path, impatient.data_root, impatient.lock_timeout_s = path, tmp_path, 0.3
        with pytest.raises(Exception, match="locked by another process"):
            impatient.list_jobs()
    finally:
        holder.kill()
        holder.wait()
