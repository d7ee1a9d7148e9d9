"""The catalog's records for the REST service: API tokens, idempotency keys, the process driving
each job, cancellation and deletion, and error rows a page at a time.

A mixin of `curate.catalog.Catalog` (which provides `_transaction`): the service and the job
drivers it starts are separate processes sharing one DuckDB file, so every method is one short
transaction. Writes here are re-run when another thread of the same process committed a
conflicting change first (DuckDB checks conflicts optimistically within a process; other processes
wait on the file lock in `Catalog._connect`).
"""

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from curate.core import atomic, storage
from curate.core.sql import quote_name
from schemas.catalog import IDEMPOTENCY_DDL
from schemas.errors import ConflictError, InternalError, NotFoundError
from schemas.job import JobSpec, StageName

T = TypeVar("T")

# A job in one of these has (or should have) a live driver.
ACTIVE = ("created", "running", "cancelling")
TERMINAL = ("done", "failed", "cancelled")
SCOPES = ("read", "write")
_WRITE_ATTEMPTS = 8


class TokenNotFound(NotFoundError):
    code = "token_not_found"


class IdempotencyConflict(ConflictError):
    """An Idempotency-Key re-used with a different request body."""

    code = "idempotency_conflict"


class JobExists(ConflictError):
    code = "job_exists"


class JobBusy(ConflictError):
    """The job's state does not allow the action: resuming or deleting a running job,
    cancelling one that is not running."""

    code = "job_busy"


class CatalogConflict(InternalError):
    code = "catalog_conflict"


def utc_now() -> datetime:
    """Now, as the catalog stores times: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def _job_not_found(job_id: str, path: Path) -> Exception:
    from curate.catalog import JobNotFound  # the module this mixin is part of

    return JobNotFound(f"no job {job_id!r} in {path}")


def migrate_idempotency_keys(con: duckdb.DuckDBPyConnection) -> None:
    """A catalog from before idempotency keys had a scope (keyed by the key alone): its table
    rebuilt with the scope in its key, its keys in the shared scope ''. DuckDB cannot change a
    primary key in place. Run by `Catalog.__init__` after the DDL, in its transaction."""
    columns = {
        name
        for (name,) in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = 'idempotency_keys'"
        ).fetchall()
    }
    if "scope" in columns:
        return
    con.execute("ALTER TABLE idempotency_keys RENAME TO idempotency_keys_unscoped")
    con.execute(IDEMPOTENCY_DDL)
    con.execute(
        "INSERT INTO idempotency_keys SELECT '', key, request_sha256, job_id, created_at "
        "FROM idempotency_keys_unscoped"
    )
    con.execute("DROP TABLE idempotency_keys_unscoped")


def token_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _token(row: tuple) -> dict[str, Any]:
    token_id, name, scope, created_at, revoked_at = row
    return {
        "token_id": token_id,
        "name": name,
        "scope": scope,
        "created_at": created_at,
        "revoked_at": revoked_at,
    }


class ServiceRecords:
    _transaction: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
    shard_paths: Callable[..., list[Path]]
    absolute: Callable[[str], Path]
    path: Path

    def _write(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`work` in one transaction, re-run on a write-write conflict within this process."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self._transaction() as con:
                    return work(con)
            except duckdb.TransactionException as error:
                if "conflict" not in str(error).lower():
                    raise
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise CatalogConflict(f"catalog {self.path}: {error}") from error
                time.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")

    # -- API tokens -------------------------------------------------------------------------

    def _tokens_file(self) -> Path:
        return Path(f"{self.path}.tokens")

    def tokens_stamp(self) -> tuple | None:
        """Changes whenever a token is created or revoked (and only then): a cache of token
        look-ups compares it, so a job committing parts does not empty that cache."""
        try:
            stat = os.stat(self._tokens_file())
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _tokens_changed(self) -> None:
        # A new file each time (a fresh inode): the stamp changes even within one clock tick.
        atomic.write_text(self._tokens_file(), secrets.token_hex(8))

    def create_token(self, scope: str, name: str | None = None) -> tuple[dict[str, Any], str]:
        """A new token: its record and its secret, which is kept nowhere (only its sha256)."""
        assert scope in SCOPES, scope
        secret = "curate_" + secrets.token_urlsafe(32)
        token_id = "tok-" + secrets.token_hex(4)
        now = utc_now()

        def insert(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "INSERT INTO api_tokens VALUES (?, ?, ?, ?, ?, NULL)",
                [token_id, name, scope, token_sha256(secret), now],
            )

        self._write(insert)
        self._tokens_changed()
        return _token((token_id, name, scope, now, None)), secret

    def tokens(self) -> list[dict[str, Any]]:
        with self._transaction() as con:
            rows = con.execute(
                "SELECT token_id, name, scope, created_at, revoked_at FROM api_tokens "
                "ORDER BY created_at, token_id"
            ).fetchall()
        return [_token(row) for row in rows]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        def revoke(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            con.execute(
                "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, ?) WHERE token_id = ?",
                [utc_now(), token_id],
            )
            row = con.execute(
                "SELECT token_id, name, scope, created_at, revoked_at FROM api_tokens "
                "WHERE token_id = ?",
                [token_id],
            ).fetchone()
            if row is None:
                raise TokenNotFound(f"no token {token_id!r}; `curate tokens list` shows them")
            return _token(row)

        token = self._write(revoke)
        self._tokens_changed()
        return token

    def token_for(self, secret: str) -> dict[str, Any] | None:
        """The live (unrevoked) token whose secret this is, or None."""
        with self._transaction() as con:
            row = con.execute(
                "SELECT token_id, name, scope, created_at, revoked_at FROM api_tokens "
                "WHERE sha256 = ? AND revoked_at IS NULL",
                [token_sha256(secret)],
            ).fetchone()
        return _token(row) if row else None

    # -- jobs the service creates and drives --------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        idempotency_key: str | None = None,
        request_sha256: str = "",
        scope: str = "",
    ) -> tuple[str, bool]:
        """Record a new job (status `created`); returns (job_id, created). With an idempotency
        key this caller (`scope`: its token's id) already used for the same request, the job it
        created and False; for another request, IdempotencyConflict. Another caller's keys
        are not seen."""
        assert spec.job_id

        def create(con: duckdb.DuckDBPyConnection) -> tuple[str, bool]:
            if idempotency_key is not None:
                row = con.execute(
                    "SELECT request_sha256, job_id FROM idempotency_keys "
                    "WHERE scope = ? AND key = ?",
                    [scope, idempotency_key],
                ).fetchone()
                if row is not None:
                    if row[0] != request_sha256:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was used for another request "
                            f"(job {row[1]}); use a new key for a different job"
                        )
                    return row[1], False
            if con.execute("SELECT 1 FROM jobs WHERE job_id = ?", [spec.job_id]).fetchone():
                raise JobExists(
                    f"job {spec.job_id!r} exists; resume it (POST /v1/jobs/{spec.job_id}/resume)"
                    " or choose another job_id"
                )
            now = utc_now()
            con.execute(
                "INSERT INTO jobs VALUES (?, ?, 'created', NULL, ?, ?)",
                [spec.job_id, spec.model_dump_json(), now, now],
            )
            if idempotency_key is not None:
                con.execute(
                    "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?)",
                    [scope, idempotency_key, request_sha256, spec.job_id, now],
                )
            return spec.job_id, True

        return self._write(create)

    def job_status(self, job_id: str) -> str | None:
        with self._transaction() as con:
            row = con.execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
        return row[0] if row else None

    def claim_job(self, job_id: str, kind: str, host: str, log_path: str | None) -> str:
        """Mark the job running under a new driver (not yet started: no ref); returns the
        driver's id. JobBusy when the job is running or being cancelled."""
        driver_id = secrets.token_hex(8)

        def claim(con: duckdb.DuckDBPyConnection) -> str:
            row = con.execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
            if row is None:
                raise _job_not_found(job_id, self.path)
            if row[0] in ("running", "cancelling"):
                raise JobBusy(f"job {job_id!r} is {row[0]}; wait for it to end")
            now = utc_now()
            con.execute(
                "UPDATE jobs SET status = 'running', message = NULL, updated_at = ? "
                "WHERE job_id = ?",
                [now, job_id],
            )
            con.execute(
                "INSERT OR REPLACE INTO job_drivers VALUES (?, ?, ?, NULL, ?, ?, ?)",
                [job_id, driver_id, kind, host, now, log_path],
            )
            return driver_id

        return self._write(claim)

    def set_driver_ref(self, job_id: str, driver_id: str, ref: str) -> None:
        """The started driver's handle (process: pid and start time; Ray: submission id)."""
        self._write(
            lambda con: con.execute(
                "UPDATE job_drivers SET ref = ? WHERE job_id = ? AND driver_id = ?",
                [ref, job_id, driver_id],
            )
        )

    def job_driver(self, job_id: str) -> dict[str, Any] | None:
        with self._transaction() as con:
            return self._driver(con, job_id)

    def _driver(self, con: duckdb.DuckDBPyConnection, job_id: str) -> dict[str, Any] | None:
        cur = con.execute(
            "SELECT d.*, j.status FROM job_drivers d JOIN jobs j USING (job_id) WHERE job_id = ?",
            [job_id],
        )
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    def active_drivers(self) -> list[dict[str, Any]]:
        """The drivers of every job that should have one running."""
        with self._transaction() as con:
            cur = con.execute(
                "SELECT d.*, j.status FROM job_drivers d JOIN jobs j USING (job_id) "
                f"WHERE j.status IN {ACTIVE}"
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def driver_stopped(self, job_id: str, driver_id: str, message: str) -> bool:
        """The driver ended without recording an end: the job becomes `failed` (`cancelled` when
        a cancel was asked for) with the message, and so do its unfinished stages. Nothing
        changes when the job has ended or another driver runs it since. True if it changed."""

        def stop(con: duckdb.DuckDBPyConnection) -> bool:
            row = con.execute(
                "SELECT j.status FROM jobs j JOIN job_drivers d USING (job_id) "
                f"WHERE job_id = ? AND d.driver_id = ? AND j.status IN {ACTIVE}",
                [job_id, driver_id],
            ).fetchone()
            if row is None:
                return False
            status = "cancelled" if row[0] == "cancelling" else "failed"
            text = f"cancelled; {message}" if status == "cancelled" else message
            now = utc_now()
            con.execute(
                "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE job_id = ?",
                [status, text, now, job_id],
            )
            con.execute(
                "UPDATE stages SET status = ?, message = ?, finished_at = ? "
                "WHERE job_id = ? AND status = 'running'",
                [status, text, now, job_id],
            )
            return True

        return self._write(stop)

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        """running -> cancelling; returns the job's driver. JobBusy unless it is running."""

        def cancel(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            driver = self._driver(con, job_id)
            row = con.execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
            if row is None:
                raise _job_not_found(job_id, self.path)
            if row[0] not in ("created", "running") or driver is None:
                raise JobBusy(
                    f"job {job_id!r} is {row[0]}"
                    + ("" if driver else " and was not started by this service")
                    + "; only a running job can be cancelled"
                )
            con.execute(
                "UPDATE jobs SET status = 'cancelling', updated_at = ? WHERE job_id = ?",
                [utc_now(), job_id],
            )
            return driver

        return self._write(cancel)

    def delete_job(self, job_id: str) -> list[Path]:
        """Forget the job: every catalog row of it and its SQL views; returns the shards it had
        registered (the files are the caller's to remove). JobBusy while it runs."""

        def delete(con: duckdb.DuckDBPyConnection) -> list[Path]:
            row = con.execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
            if row is None:
                raise _job_not_found(job_id, self.path)
            if row[0] in ACTIVE:
                raise JobBusy(f"job {job_id!r} is {row[0]}; cancel it first")
            shards = con.execute("SELECT path FROM shards WHERE job_id = ?", [job_id]).fetchall()
            for table in (
                "error_counts",
                "shards",
                "parts",
                "stages",
                "idempotency_keys",
                "job_drivers",
                "jobs",
            ):
                con.execute(f"DELETE FROM {table} WHERE job_id = ?", [job_id])
            con.execute(f"DROP SCHEMA IF EXISTS {quote_name(job_id)} CASCADE")
            return [self.absolute(path) for (path,) in shards]

        return self._write(delete)

    # -- error rows ---------------------------------------------------------------------------

    def error_rows(
        self,
        job_id: str,
        stages: Sequence[str],
        reason: str | None = None,
        after: tuple[int, int, int] | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The error rows of the stages' registered errors shards: in pipeline order, then part
        and item order, from just after `after` = (stage rank, part, item)."""
        ranks = {stage.value: rank for rank, stage in enumerate(StageName)}
        shards = {
            stage: storage.dataset(paths)
            for stage in stages
            if (paths := self.shard_paths(job_id, stage, "errors"))
        }
        selects = [
            f"SELECT {ranks[stage]} AS stage_rank, uri, stage, reason, detail, part, item "
            f"FROM {quote_name(stage + '_errors')}"
            for stage in shards
        ]
        if not selects:
            return []
        where, params = ["true"], []
        if reason is not None:
            where.append("reason = ?")
            params.append(reason)
        if after is not None:
            rank, part, item = after
            where.append(
                "(stage_rank > ? OR (stage_rank = ? AND (part > ? OR (part = ? AND item > ?))))"
            )
            params += [rank, rank, part, part, item]
        # The shards are plain files (or objects): an in-memory DuckDB reads them in place,
        # without the catalog's lock.
        con = duckdb.connect()
        try:
            for stage, shard_set in shards.items():
                con.register(f"{stage}_errors", shard_set)
            cur = con.execute(
                f"SELECT * FROM ({' UNION ALL '.join(selects)}) WHERE {' AND '.join(where)} "
                f"ORDER BY stage_rank, part, item LIMIT {int(limit)}",
                params,
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            con.close()
