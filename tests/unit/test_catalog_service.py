"""The catalog's records for the service (curate/catalog_service.py) and the job summary both
surfaces show (curate/catalog_reports.py): tokens, idempotent job creation, drivers, cancel,
delete, counts and the paged job list."""

import threading
from pathlib import Path

import pytest

from curate.catalog import Catalog, JobNotFound
from curate.catalog_service import IdempotencyConflict, JobBusy, JobExists, TokenNotFound
from curate.core.shards import PartResult, write_shard
from schemas.job import JobSpec
from tests.unit.test_catalog import commit, ingest_rows


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    return Catalog(tmp_path / "catalog.duckdb", tmp_path)


def test_tokens_are_kept_hashed_and_revoked(catalog):
    token, secret = catalog.create_token("read", "ci")
    assert catalog.token_for(secret)["token_id"] == token["token_id"]
    assert catalog.token_for(secret + "x") is None
    _, rows = catalog.query("SELECT * FROM api_tokens")
    assert secret not in str(rows)
    assert catalog.revoke_token(token["token_id"])["revoked_at"] is not None
    assert catalog.token_for(secret) is None
    assert [t["token_id"] for t in catalog.tokens()] == [token["token_id"]]
    with pytest.raises(TokenNotFound):
        catalog.revoke_token("tok-none")


def test_concurrent_writes_in_one_process_are_retried(catalog):
    """Threads of the service write the same rows; DuckDB refuses all but one at commit and
    the others run again."""
    token, _ = catalog.create_token("write")
    errors: list[BaseException] = []

    def revoke() -> None:
        try:
            for _ in range(5):
                catalog.revoke_token(token["token_id"])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=revoke) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_jobs_are_created_once_per_idempotency_key(catalog):
    spec = JobSpec(source="/src", job_id="a")
    assert catalog.create_job(spec, "key-1", "body-1") == ("a", True)
    assert catalog.create_job(spec, "key-1", "body-1") == ("a", False)
    with pytest.raises(IdempotencyConflict, match="key-1"):
        catalog.create_job(JobSpec(source="/src", job_id="b"), "key-1", "body-2")
    with pytest.raises(JobExists):
        catalog.create_job(spec)
    assert catalog.job_status("a") == "created"


def test_idempotency_keys_are_per_caller(catalog):
    """The same key from two tokens is two requests; '' is the one scope of a service
    without auth."""

    def create(job_id: str, body: str, scope: str = "") -> tuple[str, bool]:
        return catalog.create_job(JobSpec(source="/src", job_id=job_id), "k", body, scope)

    assert create("a", "body", "tok-1") == ("a", True)
    assert create("b", "body", "tok-2") == ("b", True)
    assert create("c", "body", "tok-1") == ("a", False)
    with pytest.raises(IdempotencyConflict):
        create("c", "other body", "tok-2")
    assert create("c", "body") == ("c", True)
    assert create("d", "body") == ("c", False)


def test_a_catalog_with_unscoped_keys_is_migrated(tmp_path):
    """A catalog written before keys had a scope: its keys stay, in the shared scope."""
    import duckdb

    path = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE idempotency_keys (key VARCHAR PRIMARY KEY, request_sha256 VARCHAR "
        "NOT NULL, job_id VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL)"
    )
    con.execute("INSERT INTO idempotency_keys VALUES ('old', 'body', 'a', now()::TIMESTAMP)")
    con.close()
    catalog = Catalog(path, tmp_path)
    _, rows = catalog.query("SELECT scope, key, job_id FROM idempotency_keys")
    assert rows == [("", "old", "a")]
    assert catalog.create_job(JobSpec(source="/src", job_id="b"), "old", "body", "tok-1")[1]
    Catalog(path, tmp_path)  # opening it again changes nothing
    _, rows = catalog.query("SELECT scope, key FROM idempotency_keys ORDER BY scope")
    assert rows == [("", "old"), ("tok-1", "old")]


def test_drivers_claims_cancels_and_stops(catalog):
    catalog.create_job(JobSpec(source="/src", job_id="a"))
    first = catalog.claim_job("a", "process", "host", "/log")
    with pytest.raises(JobBusy):
        catalog.claim_job("a", "process", "host", "/log")
    catalog.set_driver_ref("a", first, "123:456")
    assert catalog.job_driver("a")["ref"] == "123:456"
    catalog.start_stage("a", "ingest", 2)
    assert [d["job_id"] for d in catalog.active_drivers()] == ["a"]

    assert catalog.driver_stopped("a", "another-driver", "gone") is False
    assert catalog.job_status("a") == "running"
    assert catalog.driver_stopped("a", first, "the job's driver stopped (exit 1)") is True
    report = catalog.job_report("a")
    assert (report["status"], report["message"]) == ("failed", "the job's driver stopped (exit 1)")
    assert report["stages"][0]["status"] == "failed"
    assert catalog.driver_stopped("a", first, "again") is False, "an ended job stays as it is"
    with pytest.raises(JobBusy, match="only a running job"):
        catalog.request_cancel("a")

    second = catalog.claim_job("a", "process", "host", "/log")  # a resume
    assert catalog.request_cancel("a")["driver_id"] == second
    assert catalog.job_status("a") == "cancelling"
    assert catalog.driver_stopped("a", second, "stopped") is True
    assert catalog.job_status("a") == "cancelled"
    with pytest.raises(JobNotFound):
        catalog.claim_job("nope", "process", "host", None)


def test_a_stage_started_again_moves_the_change_time(catalog):
    catalog.create_job(JobSpec(source="/src", job_id="a"))
    catalog.start_stage("a", "ingest", 2)
    catalog.finish_stage("a", "ingest", "cancelled", 1.0)
    ended = catalog.job_detail("a")["updated_at"]
    catalog.start_stage("a", "ingest", 2)
    assert catalog.job_detail("a")["updated_at"] > ended
    restarted = catalog.job_detail("a")["stages"][0]["started_at"]
    catalog.start_stage("a", "ingest", 3)  # a running stage re-counting its parts
    assert catalog.job_detail("a")["stages"][0]["started_at"] == restarted


def test_counts_list_and_delete(catalog, tmp_path):
    catalog.open_job(JobSpec(source="/src", job_id="j"))
    catalog.start_stage("j", "ingest", 2)
    commit(catalog, tmp_path, 0, ["a", "b", "a"], {"timeout": 2})
    commit(catalog, tmp_path, 1, ["c"], {})
    decisions = write_shard(ingest_rows(0, ["a"]), tmp_path / "jobs/j/dedup/part-0.parquet")
    catalog.commit_part("j", "dedup", PartResult(0, 4, 3, {"data": decisions}, {}, 0.1))
    counts = catalog.job_counts("j")
    assert counts == {
        "items_read": 6,
        "images_kept": 3,
        "images_embedded": None,
        "curated_images": None,
        "errors": 2,
    }
    catalog.set_job_status("j", "done")
    catalog.create_job(JobSpec(source="/other", job_id="k"))
    jobs = catalog.list_jobs()
    assert [j["job_id"] for j in jobs] == ["k", "j"], "newest first"
    assert jobs[1]["counts"] == counts and jobs[0]["counts"]["errors"] == 0
    assert [j["job_id"] for j in catalog.list_jobs(limit=1)] == ["k"]
    after = (jobs[0]["created_at"], jobs[0]["job_id"])
    assert [j["job_id"] for j in catalog.list_jobs(after=after)] == ["j"]
    assert [j["job_id"] for j in catalog.list_jobs(status="created")] == ["k"]

    rows = catalog.error_rows("j", ["ingest"], reason="timeout")
    assert [(r["part"], r["item"]) for r in rows] == [(0, 100), (0, 101)]
    assert catalog.error_rows("j", ["ingest"], after=(0, 0, 100)) == rows[1:]

    catalog.set_job_status("j", "running")
    with pytest.raises(JobBusy):
        catalog.delete_job("j")
    catalog.set_job_status("j", "done")
    catalog.refresh_views("j")
    shards = catalog.delete_job("j")
    assert sorted(p.name for p in shards) == ["part-0.parquet"] * 3 + ["part-1.parquet"] * 2
    assert all(isinstance(p, Path) and p.exists() for p in shards), "files are the caller's"
    with pytest.raises(JobNotFound):
        catalog.job_report("j")
    _, tables = catalog.query(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'j'"
    )
    assert tables == [(0,)], "the job's views are gone"
    assert [j["job_id"] for j in catalog.list_jobs()] == ["k"]
