"""Quoting for the SQL we build ourselves (DuckDB): names, string literals and file lists.

Values go through parameters wherever DuckDB takes them; these are for the places it does not
(view definitions, `read_parquet` lists inside a CREATE VIEW).
"""

from collections.abc import Iterable
from pathlib import Path


def quote_name(name: str) -> str:
    """A quoted identifier: a schema, table or column name."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """A quoted string literal."""
    return "'" + value.replace("'", "''") + "'"


def path_list(paths: Iterable[Path | str]) -> str:
    """A DuckDB list literal of file names, as `read_parquet` takes it."""
    return "[" + ", ".join(literal(str(p)) for p in paths) + "]"


def read_parquet(paths: Iterable[Path | str]) -> str:
    """A `read_parquet([...])` table expression over the files."""
    return f"read_parquet({path_list(paths)})"
