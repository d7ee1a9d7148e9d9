"""The results queries: each reads a few row groups of one results-index table (results.py, read
through tables.py) and returns the stored JSON of the rows, in the REST contract's shapes.

Pages are positions: a listing's table is stored in its order, a cursor is the position the
next page starts at, and a page is one row range (clusters: held in memory, one card per
cluster). Look-ups by image or seed read the row groups whose key range holds the key. Only the
dedup groups filtered by reason go through DuckDB. An index never changes under its name, so a
cursor stays valid for as long as its index does.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq

from curate.browse.errors import ClusterNotFound, ImageNotFound, ResultsNotFound, SeedNotFound
from curate.browse.tables import RowRanges, SortedFile
from curate.core import storage
from curate.core.sql import literal
from schemas.api import InvalidField, decode_cursor, encode_cursor

CLUSTER_SORTS = {"size": "size_pos", "seed_coverage": "coverage_pos"}
_NOT_CLUSTERED = "clusters: its cluster stage has not finished"


class ResultsIndex:
    """A built results index: its folder, what it holds (meta.json), and, once asked for, the
    cluster cards in both orders and where each cluster's members are (clusters.parquet is one
    row per cluster: 100,000 at LVD scale, a few MB in memory)."""

    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.folder = folder
        self.meta: dict[str, Any] = json.loads((folder / "meta.json").read_text())
        self._clusters: tuple[dict[str, list[str]], dict[int, tuple[int, int]], RowRanges] | None
        self._clusters = None
        self._sorted: dict[str, SortedFile] = {}
        self._ranges: dict[str, RowRanges] = {}

    def sorted(self, name: str, key: str, needs: str) -> SortedFile:
        """A table sorted by `key`, its footer read once."""
        self.require(name, needs)
        if name not in self._sorted:
            self._sorted[name] = SortedFile(self.folder / f"{name}.parquet", key)
        return self._sorted[name]

    def table(self, name: str, needs: str) -> str:
        """`read_parquet(...)` of a table, or ResultsNotFound saying what is missing."""
        self.require(name, needs)
        return f"read_parquet({literal(str(self.folder / f'{name}.parquet'))})"

    def ranges(self, name: str) -> RowRanges:
        """A table's `json` column by row, its footer read once."""
        if name not in self._ranges:
            self._ranges[name] = RowRanges(self.folder / f"{name}.parquet", "json")
        return self._ranges[name]

    def require(self, name: str, needs: str) -> None:
        if name not in self.meta["tables"]:
            raise ResultsNotFound(f"job {self.job_id!r} has no {needs} yet")

    def clusters(self) -> tuple[dict[str, list[str]], dict[int, tuple[int, int]], RowRanges]:
        """(cards by sort, cluster -> (first member row, members), the members' rows)."""
        if self._clusters is None:
            self.require("clusters", _NOT_CLUSTERED)
            table = pq.read_table(self.folder / "clusters.parquet")
            cards = table.column("json").to_pylist()
            orders = {
                sort: [cards[i] for i in np.argsort(table.column(column).to_numpy())]
                for sort, column in CLUSTER_SORTS.items()
            }
            ranges = dict(
                zip(
                    table.column("cluster_id").to_pylist(),
                    zip(
                        table.column("members_start").to_pylist(),
                        table.column("members_count").to_pylist(),
                        strict=True,
                    ),
                    strict=True,
                )
            )
            self._clusters = (orders, ranges, self.ranges("members"))
        return self._clusters


@dataclass(frozen=True)
class Json:
    """A response body as JSON text; `value` parses it (tests, and callers that need data)."""

    text: str

    @property
    def value(self) -> Any:
        return json.loads(self.text)


@dataclass(frozen=True)
class Page:
    """A page of stored items (JSON texts) and the cursor of the next one."""

    raw: list[str]
    next_cursor: str | None

    @property
    def items(self) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.raw]

    @property
    def body(self) -> Json:
        cursor = json.dumps(self.next_cursor)
        return Json(f'{{"items":[{",".join(self.raw)}],"next_cursor":{cursor}}}')


def _start(cursor: str | None) -> int:
    """The position a cursor holds (0 without one); InvalidField naming query.cursor if it is
    not a cursor a page handed out."""
    if not cursor:
        return 0
    (pos,) = decode_cursor(cursor, 1)
    if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
        raise InvalidField(
            "not a cursor this service gave out: pass next_cursor from the previous page",
            field="query.cursor",
            code="cursor_invalid",
        )
    return pos


def _page(rows: list[tuple[int, str]], limit: int) -> Page:
    """rows: up to limit + 1 (pos, json) rows."""
    next_cursor = encode_cursor([rows[limit][0]]) if len(rows) > limit else None
    return Page([text for _, text in rows[:limit]], next_cursor)


# -- clusters -----------------------------------------------------------------------------------


def clusters(index: ResultsIndex, sort: str, limit: int, cursor: str | None) -> Page:
    """Clusters by size or seed coverage (most first): size, seed images per seed set,
    retrieved images per method, and the crawl images nearest the centroid."""
    start = _start(cursor)
    cards = index.clusters()[0][sort]
    more = start + limit < len(cards)
    return Page(cards[start : start + limit], encode_cursor([start + limit]) if more else None)


def members(index: ResultsIndex, cluster_id: int, limit: int, cursor: str | None) -> Page:
    """A cluster's images nearest the centroid first: crawl images and the seed images placed in
    it (seed_set set), each with the retrieve rows that picked it."""
    _, ranges, rows = index.clusters()
    if cluster_id not in ranges:
        raise ClusterNotFound(f"job {index.job_id!r} has no cluster {cluster_id}")
    first, count = ranges[cluster_id]
    start = min(_start(cursor), count)
    stop = min(start + limit, count)
    return Page(
        rows.read(first + start, first + stop), encode_cursor([stop]) if stop < count else None
    )


def cluster_map(index: ResultsIndex) -> Json:
    """The centroids in 2-D (PCA), with each cluster's size and seed coverage."""
    index.require("map", _NOT_CLUSTERED)
    return Json((index.folder / "map.json").read_text())


# -- seeds and provenance ------------------------------------------------------------------------


def _image(index: ResultsIndex, image_id: str, column: str) -> Any:
    rows = index.sorted("images", "image_id", "results").find(image_id, [column])
    return rows[0][column] if rows else None


def neighbours(index: ResultsIndex, seed_set: str, seed_id: str) -> Json:
    """The crawl images a seed image retrieved, most similar first."""
    needs = "retrieval results: its retrieve stage has not finished"
    table = index.sorted("neighbours", "key", needs)
    if seed_set not in index.meta["seed_sets"]:
        raise SeedNotFound(f"job {index.job_id!r} retrieved for no seed set {seed_set!r}")
    rows = [row["json"] for row in table.find(f"{seed_set}/{seed_id}", ["json"])]
    if not rows and seed_set not in (_image(index, seed_id, "seed_sets") or []):
        raise SeedNotFound(f"seed set {seed_set!r} of job {index.job_id!r} has no {seed_id}")
    head = json.dumps({"seed_set": seed_set, "seed_id": seed_id})[:-1]
    return Json(f'{head},"items":[{",".join(rows)}]}}')


def provenance(index: ResultsIndex, image_id: str) -> Json:
    """Where an image of the job went: its cluster, the seeds that picked it (and how), the seed
    sets it belongs to, and its dedup decision (first occurrence; `occurrences` counts repeats)."""
    found = _image(index, image_id, "json")
    if found is None:
        raise ImageNotFound(f"job {index.job_id!r} has no image {image_id}")
    return Json(found)


# -- dedup ---------------------------------------------------------------------------------------


def dedup_groups(
    db: duckdb.DuckDBPyConnection,
    index: ResultsIndex,
    reason: str | None,
    limit: int,
    cursor: str | None,
) -> Page:
    """Dedup groups, largest first: the kept representative first, then what was removed, with
    the reason and similarity; `reason` keeps the groups holding a removal of that reason."""
    table = index.table("groups", "dedup results: its dedup stage has not finished")
    start = _start(cursor)
    if reason is None:
        # Rows are stored in their order: a page is a range.
        groups = index.ranges("groups")
        stop = min(start + limit, groups.starts[-1])
        next_cursor = encode_cursor([stop]) if stop < groups.starts[-1] else None
        return Page(groups.read(start, stop), next_cursor)
    rows = db.execute(
        f"SELECT pos, json FROM {table} WHERE pos >= ? AND list_contains(reasons, ?) "
        "ORDER BY pos LIMIT ?",
        [start, reason, limit + 1],
    ).fetchall()
    return _page(rows, limit)


def curated_stats(job_dir: Path, job_id: str) -> Json:
    """The dataset card's numbers (job_dir/stats.json, written when the curated stage ends)."""
    path = job_dir / "stats.json"
    if not storage.exists(path):
        raise ResultsNotFound(f"job {job_id!r} has no curated dataset yet")
    return Json(storage.fetch(path).read_text())
