"""SIGKILL the driver at any point, re-run the job: exactly the rows of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.catalog import Catalog
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.corpus import write_folder
from tests.images import truncated_jpeg

SHARD_SIZE = 2


def registered_rows(catalog: Catalog, job: str, kind: str) -> list[tuple]:
    """Every row of the job's registered shards, as the catalog names them."""
    rows = []
    for path in catalog.shard_paths(job, "ingest", kind):
        table = pq.read_table(
            path, columns=["uri", "part", "item"] + (["image_id"] if kind == "data" else ["reason"])
        )
        rows.extend(tuple(r.values()) for r in table.to_pylist())
    return sorted(rows)


def start_driver(source: Path, data_root: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_NUM_CPUS": "2",
        "CURATE_PROGRESS": "0",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curate.cli",
            "run",
            "--source",
            str(source),
            "--job",
            "k",
            "--shard-size",
            str(SHARD_SIZE),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_when(driver: subprocess.Popen, catalog: Catalog, parts_at_least: int) -> int:
    """SIGKILL the driver once the catalog shows `parts_at_least` committed parts."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            pytest.fail(f"driver ended before the kill: {driver.stderr.read().decode()[-2000:]}")
        try:
            done = len(catalog.committed_parts("k", "ingest"))
        except Exception:  # the job is not recorded yet
            done = -1
        if done >= parts_at_least:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            return done
        time.sleep(0.02)
    pytest.fail("the driver never reached the kill point")


def clean_up(driver: subprocess.Popen) -> None:
    # The killed driver's local Ray (raylet, workers) shares its session; end it too.
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigkill_and_resume_gives_exactly_the_uninterrupted_rows(ray_local, settings, tmp_path):
    source = tmp_path / "crawl"
    paths = write_folder(source, 70)
    (source / "bad.jpg").write_bytes(truncated_jpeg())
    (source / "zcopy.jpg").write_bytes(paths[5].read_bytes())
    spec = {"source": str(source), "ingest": {"shard_size": SHARD_SIZE}}

    run_job(
        parse_job_spec({**spec, "job_id": "k"}),
        settings.model_copy(update={"data_root": tmp_path / "reference"}),
        log=lambda _: None,
    )
    reference = Catalog(tmp_path / "reference" / "catalog.duckdb", tmp_path / "reference")
    expected_data = registered_rows(reference, "k", "data")
    expected_errors = registered_rows(reference, "k", "errors")
    assert len(expected_data) == 71 and len(expected_errors) == 1

    catalog = Catalog(settings.catalog_file, settings.data_root)
    killed_at = []
    for parts_at_least in (0, 8):  # as soon as the job is recorded, then mid-stage
        driver = start_driver(source, settings.data_root)
        try:
            killed_at.append(kill_when(driver, catalog, parts_at_least))
        finally:
            clean_up(driver)
    assert killed_at[-1] < 36, "the second kill should land before the stage ends"
    assert catalog.job_report("k")["status"] == "running", "a killed driver leaves it running"

    report = run_job(parse_job_spec({**spec, "job_id": "k"}), settings, log=lambda _: None)
    assert report["status"] == "done"
    assert registered_rows(catalog, "k", "data") == expected_data
    assert registered_rows(catalog, "k", "errors") == expected_errors
    (stage,) = report["stages"]
    assert stage["parts_done"] == stage["parts_total"] == 36
    assert (stage["rows_in"], stage["rows_out"], stage["errors"]) == (72, 71, 1)
    assert stage["metrics"]["exact_duplicates"] == 1
