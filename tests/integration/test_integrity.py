"""A finished job whose shards are damaged on disk: `curate jobs verify` names them and fails, and
a re-run redoes exactly what they held (and every later stage), ending with the same rows."""

import os
import subprocess
import sys

import pyarrow.parquet as pq

from curate.catalog import Catalog
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.integration.test_pipeline import TINY, write_corpus


def verify(data_root, check_code: int, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CURATE_DATA_ROOT": str(data_root), "CURATE_PROGRESS": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "jobs", "verify", "v", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == check_code, result.stdout + result.stderr[-3000:]
    return result


def stage_lines(stdout: str) -> dict[str, list[str]]:
    """verify's table: stage -> [ok, missing, damaged]."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines()[2:9]}


def image_ids(catalog: Catalog) -> dict[str, list[str]]:
    """Per stage, every image id of its registered data shards (with repeats), sorted."""
    ids: dict[str, list[str]] = {}
    for shard in catalog.registered_shards("v"):
        if shard["kind"] == "data":
            table = pq.read_table(catalog.absolute(shard["path"]), columns=["image_id"])
            ids.setdefault(shard["stage"], []).extend(table.column("image_id").to_pylist())
    return {stage: sorted(values) for stage, values in ids.items()}


def test_damaged_shards_are_reported_then_redone_with_the_same_rows(ray_local, settings, tmp_path):
    write_corpus(tmp_path, 18)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.add_seed_set("tiny", str(tmp_path / "seeds"), "as-is+knn:2", None)
    spec = parse_job_spec(
        {"source": str(tmp_path / "crawl"), "job_id": "v", "seeds": ["tiny"], **TINY}
    )
    first = run_job(spec, settings, log=lambda _: None)
    assert first["status"] == "done"
    before = image_ids(catalog)
    assert set(before) == {
        "ingest",
        "dedup_features",
        "dedup",
        "embed",
        "cluster",
        "retrieve",
        "curated",
    }
    assert len(before["embed"]) == 18
    clean = stage_lines(verify(settings.data_root, 0).stdout)
    assert set(clean) == set(before) and all(c[1:] == ["0", "0"] for c in clean.values())

    dedup = catalog.shards("v", "dedup")[1].path
    cluster = catalog.shards("v", "cluster")[0].path
    dedup.unlink()
    cluster.write_bytes(cluster.read_bytes()[:-100])

    report = verify(settings.data_root, 1)
    rel_dedup, rel_cluster = (catalog.relative(p) for p in (dedup, cluster))
    assert f"dedup part 1: shard missing ({rel_dedup})" in report.stdout
    assert f"cluster part 0: shard damaged ({rel_cluster}; " in report.stdout
    lines = stage_lines(report.stdout)
    ingest_parts = len(catalog.shards("v", "ingest"))
    assert lines["ingest"] == [str(2 * ingest_parts), "0", "0"], "data and errors shards"
    assert lines["dedup"] == [str(ingest_parts - 1), "1", "0"]
    assert lines["cluster"][1:] == ["0", "1"]
    assert "2 of " in report.stderr and "run the job again to redo them" in report.stderr

    # What stays is not redone: the ingest and dedup_features shards, dedup's other parts.
    kept = [s.path for stage in ("ingest", "dedup_features") for s in catalog.shards("v", stage)]
    kept += [s.path for s in catalog.shards("v", "dedup") if s.path != dedup]
    written = {path: path.stat().st_mtime_ns for path in kept}
    log: list[str] = []
    again = run_job(spec, settings, log=log.append)
    assert again["status"] == "done"
    assert f"dedup part 1: shard missing ({rel_dedup}); redoing it and the stages after" in log
    assert any(line.startswith("cluster part 0: shard damaged") for line in log)
    assert "reset, as they read what is redone: embed, cluster, retrieve, curated" in log
    assert image_ids(catalog) == before
    assert {path: path.stat().st_mtime_ns for path in kept} == written
    assert dedup.exists()
    stages = {s["stage"]: s for s in again["stages"]}
    assert all(
        s["status"] == "done" and s["parts_done"] == s["parts_total"] for s in stages.values()
    )
    verify(settings.data_root, 0)

    # Damage of the same size only a hash sees: verify --repair forgets it for the next run.
    curated = catalog.shards("v", "curated")[-1].path
    data = bytearray(curated.read_bytes())
    data[len(data) // 2] ^= 0xFF
    curated.write_bytes(bytes(data))
    assert "--repair`, then a run, redoes them" in verify(settings.data_root, 1).stderr
    repaired = verify(settings.data_root, 1, "--repair")
    assert "sha256 differs" in repaired.stdout and "repaired: curated part" in repaired.stdout
    assert catalog.job_report("v")["status"] == "failed"
    assert run_job(spec, settings, log=lambda _: None)["status"] == "done"
    assert image_ids(catalog) == before
    verify(settings.data_root, 0)
