"""Idempotency keys are per caller: the same key from the same token returns the job its first
request made (200; another body is 409), from another token it is another request; a service
without auth has one shared scope."""

import pytest

from curate.settings import Settings
from services.api.settings import ServiceSettings
from tests.images import jpeg
from tests.service import run_to_end, serve


@pytest.fixture(scope="module")
def folder(api_server):
    """A folder HTTP jobs may read, with two images: a job over it is small."""
    folder = api_server.sources / "idempotency"
    folder.mkdir()
    for seed in range(2):
        (folder / f"{seed}.jpg").write_bytes(jpeg(seed=seed))
    return folder


def _end(client, job_id: str) -> None:
    """Stop the job if it still runs, follow it to its end, and delete it."""
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (202, 409)
    run_to_end(client, job_id)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204


def test_the_same_key_from_two_tokens_is_two_jobs(api_server, client, folder):
    other_token = api_server.catalog.create_token("write", "tests (second caller)")[1]
    body = {"source": str(folder), "until": "ingest"}
    key = {"Idempotency-Key": "shared-key-1"}
    with api_server.client(other_token) as other:
        first = client.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == 201, first.text
        theirs = other.post("/v1/jobs", json=body, headers=key)
        assert theirs.status_code == 201, theirs.text
        mine, their_job = first.json()["job_id"], theirs.json()["job_id"]
        assert mine != their_job

        again = client.post("/v1/jobs", json=body, headers=key)
        assert again.status_code == 200 and again.json()["job_id"] == mine
        assert other.post("/v1/jobs", json=body, headers=key).json()["job_id"] == their_job
        changed = client.post("/v1/jobs", json={**body, "until": "dedup"}, headers=key)
        assert changed.status_code == 409
        assert changed.json()["error"]["code"] == "idempotency_conflict"
        _end(client, mine)
        _end(other, their_job)


def test_without_auth_every_caller_shares_one_scope(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "0.jpg").write_bytes(jpeg())
    settings = Settings(data_root=tmp_path / "data", progress=False, num_cpus=1)
    service = ServiceSettings(port=0, auth=False, source_roots=[sources])
    body = {"source": str(sources), "until": "ingest"}
    key = {"Idempotency-Key": "anyone"}
    with serve(settings, service) as server, server.client() as one, server.client() as two:
        first = one.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == 201, first.text
        repeat = two.post("/v1/jobs", json=body, headers=key)
        assert repeat.status_code == 200 and repeat.json()["job_id"] == first.json()["job_id"]
        _end(one, first.json()["job_id"])
