"""What the service answers to requests that cannot be served: bad bodies, queries and headers are
4xx naming the field, unknown jobs and routes 404; and how it pages and filters the job list."""

import socket
import subprocess

import pytest

from curate.settings import Settings
from schemas.job import JobSpec
from services.api.settings import ServiceSettings
from tests.service import serve


@pytest.fixture(scope="module")
def sources(api_server):
    """A folder HTTP jobs may read, and a symlink inside it that leads out."""
    folder = api_server.sources / "requests"
    (folder / "images").mkdir(parents=True)
    (folder / "escape").symlink_to("/etc")
    return folder


def test_bad_bodies_are_422_naming_the_field(client, sources):
    images = str(sources / "images")
    cases = [
        ({"source": images, "dedup": {"copy_threshold": 2}}, "body.dedup.copy_threshold"),
        ({"source": images, "bogus": 1}, "body.bogus"),
        ({}, "body.source"),
        ({"source": images, "ingest": {"shard_size": "many"}}, "body.ingest.shard_size"),
        ({"source": images, "job_id": "No Spaces"}, "body.job_id"),
        ({"source": images, "recipe": "nope"}, "body.recipe"),
        ({"source": images, "recipe": "../../etc/x.yaml"}, "body.recipe"),
        ({"source": images, "until": "curated"}, "body"),
        ({"source": images, "seeds": ["never-registered"]}, "body.seeds"),
        ({"source": "/etc"}, "body.source"),
        ({"source": f"{sources}/../../../etc"}, "body.source"),
        ({"source": "relative/path"}, "body.source"),
        ({"source": str(sources / "escape")}, "body.source"),
        ({"source": str(sources / "escape" / "*.conf")}, "body.source"),
        ({"source": str(sources / "missing")}, "body.source"),
    ]
    before = client.get("/v1/jobs").json()["items"]
    for body, field in cases:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        error = response.json()["error"]
        assert error["field"] == field, (body, error)
        assert error["kind"] == "input" and error["message"], error
    assert client.get("/v1/jobs").json()["items"] == before, "no job was recorded"

    not_json = client.post(
        "/v1/jobs", content=b"{source:", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "malformed_request"
    long_key = client.post(
        "/v1/jobs", json={"source": images}, headers={"Idempotency-Key": "k" * 300}
    )
    assert long_key.status_code == 422
    assert long_key.json()["error"]["field"] == "header.idempotency-key"


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/jobs?limit=0", "query.limit"),
        ("/v1/jobs?limit=501", "query.limit"),
        ("/v1/jobs?status=sleeping", "query.status"),
        ("/v1/jobs?created_after=yesterday", "query.created_after"),
        ("/v1/jobs?cursor=garbage", "query.cursor"),
        ("/v1/jobs?cursor=WzFd", "query.cursor"),  # a cursor of the wrong shape
        ("/v1/jobs/demo/errors?stage=nowhere", "query.stage"),
        ("/v1/jobs/demo/errors?cursor=WyJhIiwgMSwgMl0=", "query.cursor"),
        ("/v1/jobs/demo/log?offset=-1", "query.offset"),
    ],
)
def test_bad_queries_are_422_naming_the_field(client, demo_job, path, field):
    response = client.get(path)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_a_bad_last_event_id_is_422(client, demo_job):
    response = client.get("/v1/jobs/demo/events", headers={"Last-Event-ID": "yesterday"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "header.last-event-id"


def test_unknown_jobs_and_routes_are_404(client):
    for method, path in [
        ("GET", "/v1/jobs/ghost"),
        ("POST", "/v1/jobs/ghost/cancel"),
        ("POST", "/v1/jobs/ghost/resume"),
        ("DELETE", "/v1/jobs/ghost"),
        ("GET", "/v1/jobs/ghost/events"),
        ("GET", "/v1/jobs/ghost/errors"),
        ("GET", "/v1/jobs/ghost/log"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "job_not_found"
    for method in ("GET", "POST", "DELETE"):
        response = client.request(method, "/v1/no/such/route")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "route_not_found"


def test_jobs_are_paged_newest_first_and_filtered(tmp_path):
    settings = Settings(data_root=tmp_path / "data", progress=False)
    with serve(settings, ServiceSettings(port=0, auth=False)) as server:
        catalog = server.catalog
        for n in range(5):
            catalog.create_job(JobSpec(source=f"/src/{n}", job_id=f"job-{n}"))
            catalog.set_job_status(f"job-{n}", "done" if n % 2 == 0 else "failed", None)
        client = server.client()
        pages, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params).json()
            pages.append([job["job_id"] for job in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [["job-4", "job-3"], ["job-2", "job-1"], ["job-0"]]

        done = client.get("/v1/jobs", params={"status": "done"}).json()["items"]
        assert [job["job_id"] for job in done] == ["job-4", "job-2", "job-0"]
        assert all(job["counts"]["items_read"] is None for job in done), "nothing ran"
        third = client.get("/v1/jobs").json()["items"][2]
        assert third["job_id"] == "job-2" and third["created_at"].endswith("Z")
        after = client.get("/v1/jobs", params={"created_after": third["created_at"]}).json()
        assert [job["job_id"] for job in after["items"]] == ["job-4", "job-3"]
        before = client.get("/v1/jobs", params={"created_before": third["created_at"]}).json()
        assert [job["job_id"] for job in before["items"]] == ["job-1", "job-0"]


def test_job_status_reads_the_catalog_only_after_it_changed(tmp_path):
    """Polls of an unchanged job are answered from memory; a change is seen by the next poll
    (nobody else was reading it: no stale answer)."""
    settings = Settings(data_root=tmp_path / "data", progress=False)
    with serve(settings, ServiceSettings(port=0, auth=False)) as server:
        server.catalog.create_job(JobSpec(source="/src", job_id="polled"))
        details = server.app.state.manager._details
        client = server.client()
        assert client.get("/v1/jobs/polled").json()["status"] == "created"
        reads = details.reads
        for _ in range(5):
            assert client.get("/v1/jobs/polled").json()["status"] == "created"
        # One more read at most: a stamp within a clock tick of the last write is not trusted.
        assert details.reads <= reads + 1
        server.catalog.set_job_status("polled", "done")
        assert client.get("/v1/jobs/polled").json()["status"] == "done"
        server.catalog.delete_job("polled")
        assert client.get("/v1/jobs/polled").status_code == 404


def test_a_dead_driver_reads_failed_and_a_restarted_service_finds_it(tmp_path):
    """Drivers recorded by a service that has gone: their processes are gone too, or on
    another machine. The next service to start says so from the start."""
    settings = Settings(data_root=tmp_path / "data", progress=False)
    with serve(settings, ServiceSettings(port=0, auth=False)) as server:
        catalog = server.catalog
        gone = subprocess.Popen(["true"])
        gone.wait()
        for job_id, host in [
            ("crashed", socket.gethostname()),
            ("stopping", socket.gethostname()),
            ("elsewhere", "another-machine"),
        ]:
            catalog.create_job(JobSpec(source="/src", job_id=job_id))
            log = tmp_path / f"{job_id}.log"
            log.write_text("starting\ncurate: the disk is full\n")
            driver = catalog.claim_job(job_id, "process", host, str(log))
            catalog.set_driver_ref(job_id, driver, f"{gone.pid}:1")
            catalog.start_stage(job_id, "ingest", 3)
        catalog.request_cancel("stopping")
    with serve(settings, ServiceSettings(port=0, auth=False)) as restarted:
        client = restarted.client()
        crashed = client.get("/v1/jobs/crashed").json()
        assert crashed["status"] == "failed"
        assert crashed["message"] == (
            f"the job's driver stopped (pid {gone.pid} is gone): the disk is full"
        )
        assert crashed["stages"][0]["status"] == "failed"
        assert client.get("/v1/jobs/stopping").json()["status"] == "cancelled"
        assert client.get("/v1/jobs/elsewhere").json()["status"] == "running"
        assert client.post("/v1/jobs/crashed/cancel").status_code == 409
        statuses = {job["job_id"]: job["status"] for job in client.get("/v1/jobs").json()["items"]}
        assert statuses == {"crashed": "failed", "stopping": "cancelled", "elsewhere": "running"}
