"""The DuckDB catalog: jobs, stages, committed parts, shards and error counts.

DuckDB lets one process at a time open a file for writing, so every method here opens the file,
runs one short transaction and closes it again; a process that finds the file locked retries.
That way a CLI run and the service can share one catalog. Only drivers call this, never workers.
"""

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb

from curate.catalog_reports import JobReports
from curate.catalog_service import ServiceRecords, migrate_idempotency_keys, utc_now
from curate.catalog_views import JobViews
from curate.core.shards import PartResult, ShardRef
from curate.core.sql import quote_name
from schemas.catalog import CATALOG_DDL, STAGE_VIEWS
from schemas.errors import ConflictError, InternalError, NotFoundError
from schemas.job import JobSpec


class CatalogError(InternalError, RuntimeError):
    """The catalog file cannot be used: locked past the timeout, or unreadable."""

    code = "catalog_unavailable"


class JobNotFound(NotFoundError, CatalogError):
    code = "job_not_found"


class JobConflict(ConflictError, CatalogError):
    """A job id re-used with a different spec."""

    code = "job_conflict"


class NameTaken(ConflictError, CatalogError):
    """A seed or evaluation set name registered otherwise already."""

    code = "name_taken"


def _is_lock_conflict(error: Exception) -> bool:
    text = str(error).lower()
    return "lock" in text and ("conflict" in text or "could not set" in text)


class Catalog(JobReports, ServiceRecords, JobViews):
    def __init__(self, path: Path, data_root: Path, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.data_root = Path(data_root)
        self.lock_timeout_s = lock_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as con:
            con.execute(CATALOG_DDL)
            migrate_idempotency_keys(con)

    # -- plumbing -----------------------------------------------------------------------------

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as error:
                if not _is_lock_conflict(error) or time.monotonic() > deadline:
                    raise CatalogError(
                        f"catalog {self.path} is locked by another process: {error}"
                    ) from error
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._connect()
        try:
            con.begin()
            yield con
            con.commit()
        except BaseException:
            # A signal (a cancelled job's SIGTERM) may land just after the commit: there is
            # then nothing to roll back, and the signal's exception is what must propagate.
            with suppress(duckdb.Error):
                con.rollback()
            raise
        finally:
            con.close()

    def stamp(self) -> tuple:
        """Changes whenever the catalog file or its write-ahead log is written: readers that
        cache what they read (the service's tokens and browse indexes) compare it, for free."""
        stamp = []
        for file in (self.path, Path(f"{self.path}.wal")):
            try:
                stat = os.stat(file)
                stamp.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def relative(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.data_root.resolve()))
        except ValueError:
            return str(path)

    def absolute(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.data_root / path

    # -- jobs ---------------------------------------------------------------------------------

    def open_job(self, spec: JobSpec) -> bool:
        """Create the job, or check that a re-run asks for the same job. True when it existed."""
        assert spec.job_id, "a job spec reaching the catalog has an id"
        with self._transaction() as con:
            row = con.execute("SELECT spec FROM jobs WHERE job_id = ?", [spec.job_id]).fetchone()
            now = utc_now()
            if row is None:
                con.execute(
                    "INSERT INTO jobs VALUES (?, ?, 'created', NULL, ?, ?)",
                    [spec.job_id, spec.model_dump_json(), now, now],
                )
                return False
            stored = JobSpec.model_validate_json(row[0])
            if stored.identity() != spec.identity():
                raise JobConflict(
                    f"job {spec.job_id!r} exists with a different spec; re-run it with the same "
                    f"options or choose another --job. Stored: {json.dumps(stored.identity())}"
                )
            if stored.until != spec.until:
                con.execute(
                    "UPDATE jobs SET spec = ?, updated_at = ? WHERE job_id = ?",
                    [spec.model_dump_json(), now, spec.job_id],
                )
            return True

    def set_job_status(self, job_id: str, status: str, message: str | None = None) -> None:
        with self._transaction() as con:
            con.execute(
                "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE job_id = ?",
                [status, message, utc_now(), job_id],
            )

    def job_spec(self, job_id: str) -> JobSpec:
        with self._transaction() as con:
            row = con.execute("SELECT spec FROM jobs WHERE job_id = ?", [job_id]).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r} in {self.path}")
        return JobSpec.model_validate_json(row[0])

    # -- stages and parts ---------------------------------------------------------------------

    def start_stage(self, job_id: str, stage: str, parts_total: int | None) -> None:
        with self._transaction() as con:
            con.execute(
                """
                INSERT INTO stages (job_id, stage, status, parts_total, started_at)
                VALUES (?, ?, 'running', ?, ?)
                ON CONFLICT (job_id, stage) DO UPDATE SET
                    status = 'running', parts_total = excluded.parts_total, message = NULL,
                    finished_at = NULL,
                    -- A resumed stage starts again (what the service's change times see); a
                    -- running one re-counting its parts does not.
                    started_at = CASE WHEN stages.status = 'running' THEN stages.started_at
                                      ELSE excluded.started_at END
                """,
                [job_id, stage, parts_total, utc_now()],
            )

    def stage_status(self, job_id: str, stage: str) -> str | None:
        with self._transaction() as con:
            row = con.execute(
                "SELECT status FROM stages WHERE job_id = ? AND stage = ?", [job_id, stage]
            ).fetchone()
        return row[0] if row else None

    def committed_parts(self, job_id: str, stage: str) -> set[int]:
        with self._transaction() as con:
            rows = con.execute(
                "SELECT part FROM parts WHERE job_id = ? AND stage = ?", [job_id, stage]
            ).fetchall()
        return {r[0] for r in rows}

    def commit_part(self, job_id: str, stage: str, result: PartResult) -> None:
        """Register a part's shards and error counts together: after this, the part is done."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO parts (job_id, stage, part, rows_in, rows_out, errors, seconds, "
                "committed_at, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    job_id,
                    stage,
                    result.part,
                    result.rows_in,
                    result.rows_out,
                    result.errors,
                    result.seconds,
                    utc_now(),
                    result.node,
                ],
            )
            con.executemany(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [
                        job_id,
                        stage,
                        kind,
                        result.part,
                        self.relative(s.path),
                        s.rows,
                        s.bytes,
                        s.checksum,
                    ]
                    for kind, s in sorted(result.shards.items())
                ],
            )
            if result.error_counts:
                con.executemany(
                    "INSERT INTO error_counts VALUES (?, ?, ?, ?, ?)",
                    [
                        [job_id, stage, result.part, reason, count]
                        for reason, count in sorted(result.error_counts.items())
                    ],
                )

    def finish_stage(
        self,
        job_id: str,
        stage: str,
        status: str,
        seconds: float,
        metrics: dict[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        with self._transaction() as con:
            con.execute(
                """
                UPDATE stages SET status = ?, finished_at = ?, seconds = seconds + ?,
                    metrics = coalesce(?, metrics), message = ?
                WHERE job_id = ? AND stage = ?
                """,
                [
                    status,
                    utc_now(),
                    seconds,
                    json.dumps(metrics) if metrics is not None else None,
                    message,
                    job_id,
                    stage,
                ],
            )

    def shards(self, job_id: str, stage: str, kind: str = "data") -> list[ShardRef]:
        """The stage's registered shards of one kind, in part order."""
        with self._transaction() as con:
            rows = con.execute(
                "SELECT part, path FROM shards WHERE job_id = ? AND stage = ? AND kind = ? "
                "ORDER BY part",
                [job_id, stage, kind],
            ).fetchall()
        return [ShardRef(part, self.absolute(path)) for part, path in rows]

    def shard_paths(self, job_id: str, stage: str, kind: str = "data") -> list[Path]:
        return [shard.path for shard in self.shards(job_id, stage, kind)]

    # -- integrity (curate/integrity.py) ------------------------------------------------------

    def registered_shards(self, job_id: str) -> list[dict[str, Any]]:
        """Every shard the job registered, as the catalog has it: stage, kind, part, path (as
        stored, relative to the data root), rows, bytes and checksum; by stage, part, kind."""
        with self._transaction() as con:
            cur = con.execute(
                "SELECT stage, kind, part, path, rows, bytes, checksum FROM shards "
                "WHERE job_id = ? ORDER BY stage, part, kind",
                [job_id],
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def invalidate_parts(
        self,
        job_id: str,
        parts: Mapping[str, Iterable[int]],
        reset: Iterable[str] = (),
        message: str = "shards missing or damaged",
    ) -> None:
        """Forget committed parts whose shards are missing or damaged, and the stages that read
        them, so that the next run redoes exactly those; in one transaction, so that no crash
        leaves a later stage recorded done over a part that is gone.

        Each stage of `parts` loses those parts' rows (parts, shards, error counts) and is
        recorded `failed` with `message`: the executor re-runs it, skipping the parts still
        committed. Each stage of `reset` loses every row and its SQL views, as if never run. A
        job recorded done is recorded failed with `message`."""
        with self._transaction() as con:
            for stage, numbers in parts.items():
                numbers = sorted(set(numbers))
                for table in ("error_counts", "shards", "parts"):
                    con.execute(
                        f"DELETE FROM {table} WHERE job_id = ? AND stage = ? "
                        "AND list_contains(?, part)",
                        [job_id, stage, numbers],
                    )
                con.execute(
                    "UPDATE stages SET status = 'failed', message = ? "
                    "WHERE job_id = ? AND stage = ?",
                    [message, job_id, stage],
                )
            for stage in reset:
                for table in ("error_counts", "shards", "parts", "stages"):
                    con.execute(
                        f"DELETE FROM {table} WHERE job_id = ? AND stage = ?", [job_id, stage]
                    )
                for view in STAGE_VIEWS.get(stage, {}):
                    con.execute(f"DROP VIEW IF EXISTS {quote_name(job_id)}.{quote_name(view)}")
            con.execute(
                "UPDATE jobs SET status = CASE WHEN status = 'done' THEN 'failed' ELSE status END, "
                "message = CASE WHEN status = 'done' THEN ? ELSE message END, updated_at = ? "
                "WHERE job_id = ?",
                [message, utc_now(), job_id],
            )

    # -- evaluation sets ----------------------------------------------------------------------

    def add_eval_set(self, name: str, location: str) -> None:
        with self._transaction() as con:
            row = con.execute("SELECT location FROM eval_sets WHERE name = ?", [name]).fetchone()
            if row is not None and row[0] != location:
                raise NameTaken(f"eval set {name!r} is registered at {row[0]}; choose another name")
            if row is None:
                con.execute("INSERT INTO eval_sets VALUES (?, ?, ?)", [name, location, utc_now()])

    def eval_sets(self) -> dict[str, str]:
        """Registered evaluation sets: name -> location."""
        with self._transaction() as con:
            rows = con.execute("SELECT name, location FROM eval_sets ORDER BY name").fetchall()
        return dict(rows)

    # -- seed sets ----------------------------------------------------------------------------

    def add_seed_set(
        self, name: str, location: str, policy: str, cap: int | None, replace: bool = False
    ) -> None:
        with self._transaction() as con:
            row = con.execute(
                "SELECT location, policy, cap FROM seed_sets WHERE name = ?", [name]
            ).fetchone()
            if row is not None and tuple(row) == (location, policy, cap):
                return  # the same registration again: its caches stay valid
            if row is not None and not replace:
                raise NameTaken(
                    f"seed set {name!r} is registered at {row[0]} with policy {row[1]}; "
                    "add --replace to change it"
                )
            con.execute(
                "INSERT OR REPLACE INTO seed_sets VALUES (?, ?, ?, ?, ?)",
                [name, location, policy, cap, utc_now()],
            )

    def seed_sets(self) -> dict[str, dict[str, Any]]:
        """Registered seed sets: name -> {location, policy, cap, created_at}."""
        with self._transaction() as con:
            rows = con.execute(
                "SELECT name, location, policy, cap, created_at FROM seed_sets ORDER BY name"
            ).fetchall()
        return {
            name: {"location": loc, "policy": pol, "cap": cap, "created_at": at.isoformat()}
            for name, loc, pol, cap, at in rows
        }

    # -- browsing (curate/browse) -------------------------------------------------------------

    def browse_inputs(self, job_id: str) -> dict[str, Any]:
        """What a job's browse index is built from, read in one transaction: its spec and
        status, its stages' statuses and every registered data shard, by stage: (part, path,
        checksum)."""
        with self._transaction() as con:
            job = con.execute("SELECT spec, status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
            if job is None:
                raise JobNotFound(f"no job {job_id!r} in {self.path}")
            stages = con.execute(
                "SELECT stage, status FROM stages WHERE job_id = ? ORDER BY stage", [job_id]
            ).fetchall()
            shards = con.execute(
                "SELECT stage, part, path, checksum FROM shards "
                "WHERE job_id = ? AND kind = 'data' ORDER BY stage, part",
                [job_id],
            ).fetchall()
        by_stage: dict[str, list[tuple[int, Path, str]]] = {}
        for stage, part, path, checksum in shards:
            by_stage.setdefault(stage, []).append((part, self.absolute(path), checksum))
        return {
            "spec": json.loads(job[0]),
            "status": job[1],
            "stages": dict(stages),
            "shards": by_stage,
        }

    def browse_job_ids(self) -> list[tuple[str, str]]:
        """(job_id, status) of the jobs with ingested images, newest first: where an image is
        looked for by id."""
        with self._transaction() as con:
            rows = con.execute(
                "SELECT job_id, status FROM jobs WHERE job_id IN "
                "(SELECT job_id FROM shards WHERE stage = 'ingest' AND kind = 'data') "
                "ORDER BY created_at DESC"
            ).fetchall()
        return [(job_id, status) for job_id, status in rows]
