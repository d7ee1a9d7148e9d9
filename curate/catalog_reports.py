"""Reports of jobs from the catalog: one job's stages and counts, the list of jobs, and the one
summary of counts (`job_counts`) that `curate jobs` and the REST service both show.

A mixin of `curate.catalog.Catalog`, which provides `_transaction`.
"""

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from schemas.job import StageName

# When anything about a job `j` last changed: its status, a stage started or ended, a part
# committed. The service's event ids and `updated_at` are this time.
_CHANGED_AT = """greatest(j.updated_at,
    (SELECT max(committed_at) FROM parts p WHERE p.job_id = j.job_id),
    (SELECT max(greatest(s.started_at, s.finished_at)) FROM stages s WHERE s.job_id = j.job_id))"""


class JobReports:
    _transaction: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
    _driver: Callable[..., dict[str, Any] | None]
    path: Path

    def list_jobs(
        self,
        status: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Job summaries, newest first: what `curate jobs list` and GET /v1/jobs show. Filters
        take naive UTC times; `after` is the (created_at, job_id) of the previous page's last."""
        where, params = ["true"], []
        for clause, value in (
            ("j.status = ?", status),
            ("j.created_at > ?", created_after),
            ("j.created_at < ?", created_before),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if after is not None:
            where.append("(j.created_at < ? OR (j.created_at = ? AND j.job_id < ?))")
            params += [after[0], after[0], after[1]]
        with self._transaction() as con:
            cur = con.execute(
                f"""
                SELECT j.job_id, j.status, j.message, j.spec->>'source' AS source, j.created_at,
                       {_CHANGED_AT} AS updated_at
                FROM jobs j WHERE {" AND ".join(where)}
                ORDER BY j.created_at DESC, j.job_id DESC
                {f"LIMIT {int(limit)}" if limit is not None else ""}
                """,
                params,
            )
            names = [d[0] for d in cur.description]
            jobs = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            counts = self._counts(con, [job["job_id"] for job in jobs])
        for job in jobs:
            job["counts"] = counts[job["job_id"]]
        return jobs

    def job_counts(self, job_id: str) -> dict[str, int | None]:
        """The counts a person asks for first (see _counts)."""
        with self._transaction() as con:
            return self._counts(con, [job_id])[job_id]

    @staticmethod
    def _counts(con: duckdb.DuckDBPyConnection, job_ids: list[str]) -> dict[str, dict]:
        """Per job: items read (ingest's source items), images kept after dedup, images embedded,
        curated images (None while the stage has committed nothing) and error rows, all stages.
        The one summary `curate jobs` and the service show."""
        counts: dict[str, dict] = {
            job_id: {
                "items_read": None,
                "images_kept": None,
                "images_embedded": None,
                "curated_images": None,
                "errors": 0,
            }
            for job_id in job_ids
        }
        if not job_ids:
            return counts
        rows = con.execute(
            """
            SELECT job_id,
                sum(rows_in) FILTER (WHERE stage = ?), sum(rows_out) FILTER (WHERE stage = ?),
                sum(rows_out) FILTER (WHERE stage = ?), sum(rows_out) FILTER (WHERE stage = ?),
                sum(errors)
            FROM parts WHERE list_contains(?, job_id) GROUP BY job_id
            """,
            [
                StageName.INGEST.value,
                StageName.DEDUP.value,
                StageName.EMBED.value,
                StageName.CURATED.value,
                job_ids,
            ],
        ).fetchall()
        for job_id, *values in rows:
            names = list(counts[job_id])
            counts[job_id] = {
                name: None if value is None else int(value)
                for name, value in zip(names, values, strict=True)
            }
        return counts

    def job_detail(self, job_id: str) -> dict[str, Any]:
        """The job report with its counts, the time anything about it last changed
        (`updated_at`: a part committed, a stage started or ended, the status) and its driver
        when the service started it; in one transaction."""
        with self._transaction() as con:
            report = self._report(con, job_id)
            report["counts"] = self._counts(con, [job_id])[job_id]
            (changed,) = con.execute(
                f"SELECT {_CHANGED_AT} FROM jobs j WHERE job_id = ?", [job_id]
            ).fetchone()
            report["updated_at"] = changed.isoformat()
            report["driver"] = self._driver(con, job_id)
        return report

    def job_report(self, job_id: str) -> dict[str, Any]:
        """Everything `curate jobs show` prints, as plain data."""
        with self._transaction() as con:
            return self._report(con, job_id)

    def _report(self, con: duckdb.DuckDBPyConnection, job_id: str) -> dict[str, Any]:
        job = con.execute(
            "SELECT job_id, status, message, spec, created_at, updated_at FROM jobs "
            "WHERE job_id = ?",
            [job_id],
        ).fetchone()
        if job is None:
            from curate.catalog import JobNotFound  # the module this mixin is part of

            raise JobNotFound(f"no job {job_id!r} in {self.path}")
        stages = con.execute(
            """
            SELECT s.stage, s.status, s.parts_total, count(p.part) AS parts_done,
                   coalesce(sum(p.rows_in), 0), coalesce(sum(p.rows_out), 0),
                   coalesce(sum(p.errors), 0), s.seconds, s.metrics, s.message,
                   s.started_at, s.finished_at
            FROM stages s LEFT JOIN parts p USING (job_id, stage)
            WHERE s.job_id = ? GROUP BY ALL ORDER BY s.started_at
            """,
            [job_id],
        ).fetchall()
        reasons = con.execute(
            "SELECT stage, reason, sum(count) FROM error_counts WHERE job_id = ? "
            "GROUP BY ALL ORDER BY 1, 3 DESC, 2",
            [job_id],
        ).fetchall()
        report_stages = []
        for row in stages:
            stage = row[0]
            report_stages.append(
                {
                    "stage": stage,
                    "status": row[1],
                    "parts_total": row[2],
                    "parts_done": row[3],
                    "rows_in": row[4],
                    "rows_out": row[5],
                    "errors": row[6],
                    "seconds": round(row[7] or 0.0, 3),
                    "metrics": json.loads(row[8]) if row[8] else {},
                    "message": row[9],
                    "started_at": row[10].isoformat() if row[10] else None,
                    "finished_at": row[11].isoformat() if row[11] else None,
                    "errors_by_reason": {r: int(n) for s, r, n in reasons if s == stage},
                }
            )
        return {
            "job_id": job[0],
            "status": job[1],
            "message": job[2],
            "spec": json.loads(job[3]),
            "created_at": job[4].isoformat(),
            "updated_at": job[5].isoformat(),
            "stages": report_stages,
        }
