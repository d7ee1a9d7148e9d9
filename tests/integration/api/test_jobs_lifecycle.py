"""A job's whole life over HTTP with real drivers (child processes, local Ray) and one catalog:
submit, follow its events to the end, cancel it mid-stage, lose its driver, resume it to the rows
of an uninterrupted run, read it while it writes, and delete it.

The interrupted job reads a URL list from a server in this test that answers the first ingest
part at once and holds the others until the test lets them go: the cancel and the kill land at
fixed points (one part committed, the rest waiting), not after some time.
"""

import asyncio
import os
import signal
import threading
from collections import Counter

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from tests.http_server import ServedSite
from tests.images import jpeg, truncated_jpeg
from tests.service import Event, driver_log, follow_events, run_to_end

SHARD_SIZE = 4
URLS = 16  # four ingest parts; the first answers at once


class GatedImages:
    """/img/<n>.jpg: images 0..SHARD_SIZE-1 at once, the rest once `open()` is called.
    /img/copy.jpg repeats image 1; /img/bad.jpg is a truncated JPEG."""

    def __init__(self) -> None:
        self.site = ServedSite(self.routes)
        self._gate: asyncio.Event | None = None

    def routes(self, site: ServedSite) -> list[web.RouteDef]:
        async def image(request: web.Request) -> web.Response:
            if self._gate is None:
                self._gate = asyncio.Event()
            name = request.match_info["n"]
            if not (name.isdigit() and int(name) < SHARD_SIZE):
                await self._gate.wait()
            if name == "bad":
                return web.Response(body=truncated_jpeg(), content_type="image/jpeg")
            seed = 1 if name == "copy" else int(name)
            return web.Response(body=jpeg(96, 80, seed=seed), content_type="image/jpeg")

        return [web.get("/img/{n}.jpg", image)]

    def open(self) -> None:
        def release() -> None:
            if self._gate is None:
                self._gate = asyncio.Event()
            self._gate.set()

        self.site._loop.call_soon_threadsafe(release)


@pytest.fixture(scope="module")
def gated(api_server):
    images = GatedImages()
    with images.site:
        names = [str(n) for n in range(URLS - 2)] + ["copy", "bad"]
        url_list = api_server.sources / "gated" / "urls.txt"
        url_list.parent.mkdir()
        url_list.write_text("".join(images.site.url(f"/img/{n}.jpg") + "\n" for n in names))
        yield images, url_list


def url_job(url_list, job_id: str) -> dict:
    return {
        "job_id": job_id,
        "source": str(url_list),
        "until": "dedup",
        "ingest": {"shard_size": SHARD_SIZE},
    }


def wait_for(client, job_id: str, ingest_is) -> Event:
    """Follow the job's events until its ingest stage is as `ingest_is` says."""
    for event in follow_events(client, job_id):
        assert event.event != "end", f"the job ended first: {event.data}"
        stages = {s["stage"]: s for s in event.data["stages"]} if event.event == "progress" else {}
        if "ingest" in stages and ingest_is(stages["ingest"]):
            return event
    raise AssertionError("the event stream ended without an end event")


def registered_rows(catalog, job_id: str) -> dict[str, list[tuple]]:
    """Every row of the job's registered ingest, ingest-error and dedup shards."""
    columns = {
        ("ingest", "data"): ["uri", "image_id", "part", "item"],
        ("ingest", "errors"): ["uri", "reason", "part", "item"],
        ("dedup", "data"): ["uri", "image_id", "keep", "reason", "group_id", "duplicate_of"],
    }
    rows = {}
    for (stage, kind), names in columns.items():
        found = []
        for path in catalog.shard_paths(job_id, stage, kind):
            found += [tuple(r.values()) for r in pq.read_table(path, columns=names).to_pylist()]
        rows[f"{stage}/{kind}"] = sorted(found, key=str)
    return rows


def test_submit_and_follow_events_to_the_end(demo_job, api_server, client):
    events = api_server.demo_events
    assert [e.event for e in events].count("end") == 1 and events[-1].event == "end"
    ids = [e.id for e in events if e.id is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "event ids only grow"
    progress = [e.data for e in events if e.event == "progress"]
    assert any(p["status"] == "running" for p in progress)
    assert len(progress) >= 2, "progress is reported while the job runs"

    detail = client.get("/v1/jobs/demo").json()
    assert detail == events[-1].data, "the end event is the final state"
    stages = {s["stage"]: s for s in detail["stages"]}
    assert list(stages) == [
        "ingest",
        "dedup_features",
        "dedup",
        "embed",
        "cluster",
        "retrieve",
        "curated",
    ]
    for stage in stages.values():
        assert stage["status"] == "done" and stage["parts_done"] == stage["parts_total"]
    counts = detail["counts"]
    assert counts["items_read"] == stages["ingest"]["rows_in"] == 120
    assert counts["images_kept"] == stages["dedup"]["rows_out"] < stages["ingest"]["rows_out"]
    assert counts["curated_images"] == stages["curated"]["rows_out"] > 0
    assert counts["errors"] == sum(stages["ingest"]["errors_by_reason"].values()) > 0
    assert detail["updated_at"].endswith("Z") and detail["spec"]["seeds"] == ["demo"]

    # The same summary in `curate jobs list` and GET /v1/jobs.
    (summary,) = [j for j in client.get("/v1/jobs").json()["items"] if j["job_id"] == "demo"]
    assert summary["counts"] == counts

    # Resuming after the end: the final state at once, whatever id the client saw last.
    again = list(follow_events(client, "demo", last_event_id=events[-1].id))
    assert [e.event for e in again] == ["end"] and again[0].id == events[-1].id
    log = client.get("/v1/jobs/demo/log")
    assert log.status_code == 200 and "job demo: 120 image files" in log.text
    tail = client.get("/v1/jobs/demo/log", params={"offset": len(log.content) - 10})
    assert tail.text == log.text[-10:] or tail.content == log.content[-10:]
    assert int(tail.headers["x-next-offset"]) == len(log.content)

    errors = client.get("/v1/jobs/demo/errors", params={"limit": 3}).json()
    assert len(errors["items"]) == 3 and errors["next_cursor"]
    rest = client.get("/v1/jobs/demo/errors", params={"cursor": errors["next_cursor"]}).json()
    every = errors["items"] + rest["items"]
    assert len(every) == counts["errors"] and len({(e["part"], e["item"]) for e in every}) == len(
        every
    )
    by_reason = Counter(e["reason"] for e in every)
    assert by_reason == Counter(stages["ingest"]["errors_by_reason"])
    too_small = client.get("/v1/jobs/demo/errors", params={"reason": "too_small"}).json()
    assert [e["reason"] for e in too_small["items"]] == ["too_small"] * by_reason["too_small"]
    assert client.get("/v1/jobs/demo/errors", params={"stage": "embed"}).json()["items"] == []


def test_a_cancel_right_after_submit_ends_cancelled(demo_job, client, gated):
    """Wherever the SIGTERM lands (the driver importing, Ray starting, the first stage), the job
    ends `cancelled`: the gate is shut, so it cannot have finished first."""
    _, url_list = gated
    assert client.post("/v1/jobs", json=url_job(url_list, "early")).status_code == 201
    assert client.post("/v1/jobs/early/cancel").status_code == 202
    end = run_to_end(client, "early")[-1].data
    assert end["status"] == "cancelled", driver_log(client, "early")
    assert end["message"].startswith("cancelled"), end["message"]
    assert client.delete("/v1/jobs/early").status_code == 204


def test_cancel_mid_stage_kill_the_driver_then_resume_to_the_same_rows(
    demo_job, api_server, client, gated
):
    images, url_list = gated
    catalog = api_server.catalog
    job = "gated"
    assert client.post("/v1/jobs", json=url_job(url_list, job)).status_code == 201

    # Fixed point 1: ingest has committed its first part; the others wait on the gate.
    seen = wait_for(client, job, lambda ingest: ingest["parts_done"] >= 1)
    # Nothing can change while the gate is shut: a stream resumed from that event only beats.
    resumed_stream = follow_events(client, job, last_event_id=seen.id)
    assert next(resumed_stream).event == "heartbeat"
    resumed_stream.close()
    cancelled = client.post(f"/v1/jobs/{job}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelling"
    end = run_to_end(client, job)[-1].data
    assert end["status"] == "cancelled", driver_log(client, job)
    (ingest,) = [s for s in end["stages"] if s["stage"] == "ingest"]
    assert ingest["status"] == "cancelled" and ingest["parts_total"] == 4
    assert catalog.committed_parts(job, "ingest") == {0}, "the committed part stays, alone"
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 409, "not running any more"

    # Fixed point 2: resumed with the gate still shut, its driver dies inside ingest.
    resumed = client.post(f"/v1/jobs/{job}/resume")
    assert resumed.status_code == 202 and resumed.json()["status"] == "running"
    assert client.post(f"/v1/jobs/{job}/resume").status_code == 409, "already running"
    assert client.delete(f"/v1/jobs/{job}").status_code == 409, "running jobs stay"
    wait_for(client, job, lambda ingest: ingest["status"] == "running")
    pid = int(catalog.job_driver(job)["ref"].split(":")[0])
    os.kill(pid, signal.SIGKILL)
    end = run_to_end(client, job)[-1].data
    assert end["status"] == "failed"
    assert end["message"].startswith("the job's driver stopped (killed by SIGKILL)")
    assert catalog.committed_parts(job, "ingest") == {0}

    # The gate opens: the resumed job ends like one that never stopped.
    images.open()
    assert client.post(f"/v1/jobs/{job}/resume").status_code == 202
    end = run_to_end(client, job)[-1].data
    assert end["status"] == "done", driver_log(client, job)
    assert end["counts"]["items_read"] == URLS and end["counts"]["images_kept"] <= URLS - 2

    # The uninterrupted run, submitted with an idempotency key while reads go on.
    reference = url_job(url_list, "gated-ref")
    key = {"Idempotency-Key": "gated-ref-1"}
    first = client.post("/v1/jobs", json=reference, headers=key)
    assert first.status_code == 201
    reads = ReadsWhileWriting(api_server, client, "gated-ref")
    reads.start()
    repeat = client.post("/v1/jobs", json=reference, headers=key)
    assert repeat.status_code == 200 and repeat.json()["job_id"] == "gated-ref"
    other = client.post("/v1/jobs", json={**reference, "job_id": "gated-other"}, headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    taken = client.post("/v1/jobs", json=reference)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "job_exists"
    assert run_to_end(client, "gated-ref")[-1].data["status"] == "done"
    reads.join()
    assert reads.failures == [], reads.failures[:5]
    assert reads.writes_seen >= 2, "the reads overlapped the job's commits"
    assert client.post("/v1/jobs", json=reference, headers=key).status_code == 200

    assert registered_rows(catalog, job) == registered_rows(catalog, "gated-ref")

    # Delete: rows, views and folder go; the other job stays.
    job_dir = api_server.settings.job_dir(job)
    assert job_dir.is_dir()
    assert client.delete(f"/v1/jobs/{job}").status_code == 204
    assert client.get(f"/v1/jobs/{job}").status_code == 404
    assert client.delete(f"/v1/jobs/{job}").status_code == 404
    assert not job_dir.exists()
    for table in ("jobs", "stages", "parts", "shards", "error_counts", "job_drivers"):
        _, rows = catalog.query(f"SELECT count(*) FROM {table} WHERE job_id = '{job}'")
        assert rows == [(0,)], table
    assert client.get("/v1/jobs/gated-ref").json()["status"] == "done"


class ReadsWhileWriting(threading.Thread):
    """GET the job, the list and the errors until the job ends; every answer must be a 200."""

    def __init__(self, api_server, client, job_id: str) -> None:
        super().__init__(daemon=True)
        self.client = api_server.client(client.headers["authorization"].split()[1])
        self.job_id = job_id
        self.failures: list[str] = []
        self.writes_seen = 0

    def run(self) -> None:
        seen: set[str] = set()
        with self.client:
            while True:
                job = f"/v1/jobs/{self.job_id}"
                for path in (job, "/v1/jobs", f"{job}/errors"):
                    response = self.client.get(path)
                    if response.status_code != 200:
                        self.failures.append(f"{path}: {response.status_code} {response.text}")
                detail = self.client.get(f"/v1/jobs/{self.job_id}").json()
                if detail.get("status") == "running":
                    seen.add(detail["updated_at"])
                ended = detail.get("status") in ("done", "failed", "cancelled")
                if ended or len(self.failures) > 20:
                    break
        self.writes_seen = len(seen)
