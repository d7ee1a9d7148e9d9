"""curate.core.sql: quoting that survives quotes in names and paths (DuckDB executes it)."""

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.sql import literal, path_list, quote_name, read_parquet


def test_quoted_names_literals_and_file_lists_round_trip_through_duckdb(tmp_path):
    folder = tmp_path / 'o\'brien "shards"'
    folder.mkdir()
    paths = []
    for i in range(2):
        paths.append(folder / f"part-{i}.parquet")
        pq.write_table(pa.table({"x": [i, i + 10]}), paths[-1])
    schema, text = quote_name('job "a"'), literal("it's")
    with duckdb.connect() as con:
        con.execute(f"CREATE SCHEMA {schema}")
        con.execute(
            f"CREATE VIEW {schema}.{quote_name('v')} AS "
            f"SELECT x, {text} AS s FROM {read_parquet(paths)}"
        )
        rows = con.execute('SELECT * FROM "job ""a""".v ORDER BY x').fetchall()
    assert rows == [(0, "it's"), (1, "it's"), (10, "it's"), (11, "it's")]
    assert path_list([]) == "[]"
