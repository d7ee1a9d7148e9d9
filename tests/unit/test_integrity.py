"""Shard integrity without Ray: each kind of damage found at the depth that can see it, and the
parts forgotten so that a run redoes them with every later stage."""

import pyarrow as pa

from curate.catalog import Catalog
from curate.core.shards import PartResult, write_shard
from curate.integrity import (
    DAMAGED,
    MISSING,
    OK,
    ShardCheck,
    check_job,
    plan_redo,
    redo_damaged,
    stage_counts,
)
from schemas.job import parse_job_spec

STAGES = ("ingest", "dedup_features", "dedup", "embed")


def job_with_shards(root) -> Catalog:
    """Job `j`: three parts in each of four stages, one data shard each, all recorded done."""
    catalog = Catalog(root / "catalog.duckdb", root)
    catalog.open_job(parse_job_spec({"source": "s", "job_id": "j"}))
    for stage in STAGES:
        catalog.start_stage("j", stage, 3)
        for part in range(3):
            table = pa.table({"image_id": [f"{stage}-{part}-{n}" for n in range(50)]})
            shard = write_shard(table, root / f"jobs/j/{stage}/part-{part}.parquet")
            catalog.commit_part("j", stage, PartResult(part, 50, 50, {"data": shard}))
        catalog.finish_stage("j", stage, "done", 1.0)
    catalog.set_job_status("j", "done")
    return catalog


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def bad(checks: list[ShardCheck]) -> list[tuple[str, int, str]]:
    return [(c.stage, c.part, c.state) for c in checks if c.state != OK]


def test_each_damage_is_found_at_the_depth_that_sees_it(tmp_path):
    catalog = job_with_shards(tmp_path)
    assert bad(check_job(catalog, "j", full=True)) == []

    (tmp_path / "jobs/j/embed/part-2.parquet").unlink()
    truncated = tmp_path / "jobs/j/dedup/part-1.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    flip_a_byte(tmp_path / "jobs/j/ingest/part-0.parquet")

    quick = check_job(catalog, "j", full=False)
    assert bad(quick) == [("dedup", 1, DAMAGED), ("embed", 2, MISSING)]
    full = check_job(catalog, "j", full=True, threads=2)
    assert bad(full) == [("ingest", 0, DAMAGED), ("dedup", 1, DAMAGED), ("embed", 2, MISSING)]
    assert [c.stage for c in full][::3] == list(STAGES), "in pipeline order"
    flipped, short, missing = (c for c in full if c.state != OK)
    assert not flipped.seen_by_run and short.seen_by_run and missing.seen_by_run
    assert missing.describe() == "embed part 2: shard missing (jobs/j/embed/part-2.parquet)"
    assert "bytes, registered" in short.describe()
    counts = stage_counts(full)
    assert list(counts) == list(STAGES)
    assert dict(counts["embed"]) == {OK: 2, MISSING: 1, DAMAGED: 0}

    redo = plan_redo(full)
    assert redo.parts == {"ingest": [0]}
    assert redo.reset == ["dedup_features", "dedup", "embed", "cluster", "retrieve", "curated"]


def test_a_run_forgets_the_bad_parts_and_resets_the_stages_after(tmp_path):
    catalog = job_with_shards(tmp_path)
    job_dir = tmp_path / "jobs/j"
    assert redo_damaged(catalog, "j", job_dir) == [], "nothing to do when all is well"

    (job_dir / "dedup_features/part-1.parquet").unlink()
    (job_dir / "embed/part-0.parquet").write_bytes(b"PAR1")
    (job_dir / "dedup/centroids.npy").write_bytes(b"a whole-stage result of a reset stage")
    lines = redo_damaged(catalog, "j", job_dir)

    assert lines[0] == (
        "dedup_features part 1: shard missing (jobs/j/dedup_features/part-1.parquet); "
        "redoing it and the stages after"
    )
    assert lines[1].startswith("embed part 0: shard damaged (jobs/j/embed/part-0.parquet; 4 ")
    assert lines[1].endswith("; redoing its stage whole")
    assert (
        lines[2] == "reset, as they read what is redone: dedup, embed, cluster, retrieve, curated"
    )
    assert catalog.committed_parts("j", "ingest") == {0, 1, 2}
    assert catalog.committed_parts("j", "dedup_features") == {0, 2}
    assert catalog.committed_parts("j", "dedup") == catalog.committed_parts("j", "embed") == set()
    assert not (job_dir / "dedup").exists() and not (job_dir / "embed").exists()
    assert (job_dir / "dedup_features/part-0.parquet").exists(), "its good parts stay"
    report = catalog.job_report("j")
    assert report["status"] == "failed" and "run the job again to redo it" in report["message"]
    statuses = {s["stage"]: s["status"] for s in report["stages"]}
    assert statuses == {"ingest": "done", "dedup_features": "failed"}
    assert bad(check_job(catalog, "j", full=True)) == [], "what is left registered is whole"
