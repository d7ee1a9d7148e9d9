"""SIGKILL the driver at any point, re-run the job: exactly the rows of an uninterrupted run."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from curate.catalog import Catalog
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.http_server import ServedSite
from tests.images import jpeg, truncated_jpeg

SHARD_SIZE = 2
IMAGES = 70
# Slow responses stretch the stage over seconds, so the kills land inside it.
RESPONSE_DELAY_S = 0.15


def slow_images(site: ServedSite) -> list[web.RouteDef]:
    async def image(request: web.Request) -> web.Response:
        await asyncio.sleep(RESPONSE_DELAY_S)
        n = request.match_info["n"]
        if n == "bad":
            return web.Response(body=truncated_jpeg(), content_type="image/jpeg")
        seed = 5 if n == "copy" else int(n)  # /img/copy.jpg repeats /img/5.jpg
        return web.Response(body=jpeg(100, 90, seed=seed), content_type="image/jpeg")

    return [web.get("/img/{n}.jpg", image)]


def registered_rows(catalog: Catalog, job: str, kind: str) -> list[tuple]:
    """Every row of the job's registered shards."""
    columns = ["uri", "part", "item", "image_id" if kind == "data" else "reason"]
    rows = []
    for path in catalog.shard_paths(job, "ingest", kind):
        rows.extend(tuple(r.values()) for r in pq.read_table(path, columns=columns).to_pylist())
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
            "services.cli.main",
            "run",
            "--source",
            str(source),
            "--job",
            "k",
            "--until",
            "ingest",
            "--shard-size",
            str(SHARD_SIZE),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_when(driver: subprocess.Popen, catalog: Catalog, parts_at_least: int) -> int:
    """SIGKILL the driver once the job is recorded with `parts_at_least` committed parts."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            pytest.fail(f"driver ended before the kill: {driver.stderr.read().decode()[-2000:]}")
        recorded = any(job["job_id"] == "k" for job in catalog.list_jobs())
        done = len(catalog.committed_parts("k", "ingest"))
        if recorded and done >= parts_at_least:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            return done
        time.sleep(0.02)
    pytest.fail("the driver never reached the kill point")


def test_sigkill_and_resume_gives_exactly_the_uninterrupted_rows(ray_local, settings, tmp_path):
    with ServedSite(slow_images) as site:
        names = [str(n) for n in range(IMAGES)] + ["bad", "copy"]
        source = tmp_path / "urls.txt"
        source.write_text("".join(site.url(f"/img/{n}.jpg") + "\n" for n in names))
        spec = {
            "source": str(source),
            "job_id": "k",
            "until": "ingest",
            "ingest": {"shard_size": SHARD_SIZE},
        }
        parts_total = len(names) // SHARD_SIZE

        reference_root = tmp_path / "reference"
        run_job(
            parse_job_spec(spec),
            settings.model_copy(update={"data_root": reference_root}),
            log=lambda _: None,
        )
        reference = Catalog(reference_root / "catalog.duckdb", reference_root)
        expected_data = registered_rows(reference, "k", "data")
        expected_errors = registered_rows(reference, "k", "errors")
        assert len(expected_data) == IMAGES + 1 and len(expected_errors) == 1

        catalog = Catalog(settings.catalog_file, settings.data_root)
        killed_at = []
        for parts_at_least in (0, 10):  # as soon as the job is recorded, then mid-stage
            driver = start_driver(source, settings.data_root)
            try:
                killed_at.append(kill_when(driver, catalog, parts_at_least))
            finally:
                # The killed driver's local Ray (raylet, workers) shares its session: end it too.
                try:
                    os.killpg(driver.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert killed_at[-1] < parts_total, "the second kill should land inside the stage"
        assert catalog.job_report("k")["status"] == "running", "a killed driver leaves it running"

        report = run_job(parse_job_spec(spec), settings, log=lambda _: None)

    assert report["status"] == "done"
    assert registered_rows(catalog, "k", "data") == expected_data
    assert registered_rows(catalog, "k", "errors") == expected_errors
    (stage,) = report["stages"]
    assert stage["parts_done"] == stage["parts_total"] == parts_total
    assert (stage["rows_in"], stage["rows_out"], stage["errors"]) == (72, 71, 1)
    assert stage["metrics"]["exact_duplicates"] == 1
