"""The catalog's SQL face: each job's views over exactly its registered shards, and read-only
queries against the catalog and those views (`curate sql`)."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import duckdb

from curate.core import storage
from curate.core.sql import path_list, quote_name
from schemas.catalog import STAGE_VIEWS
from schemas.shards import ERRORS

_EMPTY_ERRORS = (
    "(SELECT "
    + ", ".join(
        f"CAST(NULL AS {'INTEGER' if str(f.type) == 'int32' else 'VARCHAR'}) AS {f.name}"
        for f in ERRORS
    )
    + " LIMIT 0)"
)


class JobViews:
    _transaction: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
    _connect: Callable[..., duckdb.DuckDBPyConnection]
    absolute: Callable[[str], Path]
    data_root: Path

    # -- views --------------------------------------------------------------------------------

    def refresh_views(self, job_id: str, fetched: bool = False) -> None:
        """(Re)create the job's SQL views over exactly its registered shards. DuckDB reads them
        as local files: on an object store root, `curate sql` fetches them and calls this."""
        if storage.is_remote(self.data_root) and not fetched:
            return
        with self._transaction() as con:
            rows = con.execute(
                "SELECT stage, kind, path FROM shards WHERE job_id = ? ORDER BY stage, kind, part",
                [job_id],
            ).fetchall()
            by_stage: dict[str, dict[str, list[Path]]] = {}
            for stage, kind, path in rows:
                by_stage.setdefault(stage, {}).setdefault(kind, []).append(self.absolute(path))
            schema = quote_name(job_id)
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            for stage, kinds in by_stage.items():
                sources = {
                    kind: f"read_parquet({path_list(paths)}, union_by_name = true)"
                    for kind, paths in kinds.items()
                }
                # A stage without errors writes no errors shards; its errors view is then empty.
                if "errors" not in sources:
                    sources["errors"] = _EMPTY_ERRORS
                for view, template in STAGE_VIEWS.get(stage, {}).items():
                    con.execute(
                        f"CREATE OR REPLACE VIEW {schema}.{quote_name(view)} AS "
                        + template.format(**sources)
                    )

    # -- SQL --------------------------------------------------------------------------------

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement against the catalog and its views."""
        con = self._connect(read_only=True)
        try:
            cur = con.execute(sql)
            names = [d[0] for d in cur.description] if cur.description else []
            return names, cur.fetchall() if names else []
        finally:
            con.close()
