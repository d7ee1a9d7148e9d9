"""A job's browse indexes are built when the service sees it ended (services/api/warm.py), not on
its first results request; with warming off, the first request builds them (the lazy path)."""

import shutil
import time
from pathlib import Path

from curate.browse.build import BROWSE_DIR
from curate.catalog import Catalog
from curate.settings import Settings
from services.api.settings import ServiceSettings
from tests.service import serve


def _data_root_with_only(source: Path, job_id: str, target: Path) -> Settings:
    """A copy of the tests' data root whose catalog holds `job_id` alone (the others' rows
    gone, so no driver of theirs is this copy's business), with no browse index or thumbnail."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(BROWSE_DIR, "thumbs"))
    catalog = Catalog(target / "catalog.duckdb", target)
    for job in catalog.list_jobs():
        if job["job_id"] != job_id:
            catalog.set_job_status(job["job_id"], "cancelled")
            catalog.delete_job(job["job_id"])
    return Settings(data_root=target, progress=False)


def _wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def test_an_ended_job_is_indexed_before_its_first_request(api_server, demo_job, tmp_path):
    job = demo_job["job_id"]
    settings = _data_root_with_only(api_server.settings.data_root, job, tmp_path / "data")
    browse = settings.job_dir(job) / BROWSE_DIR
    ingest_parts = len(Catalog(settings.catalog_file, settings.root).shard_paths(job, "ingest"))
    with serve(settings, ServiceSettings(port=0, auth=False)) as server:
        warmer = server.app.state.warmer
        _wait_until(lambda: job in warmer.warmed, "the warmer built the demo job's indexes")
        results = list(browse.glob("results-*"))
        assert len(results) == 1 and (results[0] / "clusters.parquet").exists()
        crawl = list((browse / "locations").glob("crawl-*.parquet"))
        assert len(crawl) == ingest_parts, "a location index per ingest shard"
        built = {path: path.stat().st_mtime_ns for path in [results[0], *crawl]}

        with server.client() as client:
            cards = client.get(f"/v1/jobs/{job}/clusters")
            assert cards.status_code == 200 and cards.json()["items"]
            image = cards.json()["items"][0]["nearest"][0]
            assert client.get(f"/v1/images/{image}").status_code == 200
        assert list(browse.glob("results-*")) == results, "the request built nothing"
        assert {path: path.stat().st_mtime_ns for path in built} == built


def test_without_warming_the_first_request_builds_the_index(api_server, demo_job, tmp_path):
    job = demo_job["job_id"]
    settings = _data_root_with_only(api_server.settings.data_root, job, tmp_path / "data")
    browse = settings.job_dir(job) / BROWSE_DIR
    with serve(settings, ServiceSettings(port=0, auth=False, warm_indexes=False)) as server:
        assert server.app.state.warmer.warmed == {}
        assert not list(browse.glob("results-*"))
        with server.client() as client:
            cards = client.get(f"/v1/jobs/{job}/clusters")
            assert cards.status_code == 200 and cards.json()["items"]
        assert len(list(browse.glob("results-*"))) == 1
