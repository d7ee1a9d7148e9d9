"""Searching the crawl's kNN index shard by shard: each shard returns the k best of every query
with its own keys, and the caller merges them into the k best overall.

The crawl index is split by id range (crawl_index.py), so a shard's k best of a query are found
among its own rows alone and no process ever holds every key: a shard's searcher holds its index
and its keys, and what travels is k hits a query a shard. The merge keeps, per query, the k hits
of highest similarity, ties broken by (shard, row): the order in which a single index over the
whole crawl would have numbered them, so the result does not depend on how many shards there are.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.core.knn_index import KnnIndex

# One shard's hits for a block of queries: query is the row of the block, row the hit's id in its
# shard (its row in the shard's keys); only real hits, never FAISS's -1 padding.
HITS = pa.schema(
    [
        ("query", pa.int32()),
        ("similarity", pa.float32()),
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
    ]
)


def string_array(values) -> pa.Array:
    """Strings as one Arrow array (a chunked column combined, a list converted)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(list(values), pa.string())
    return values.cast(pa.string())


@dataclass
class CrawlKeys:
    """The crawl image of every id of a kNN index (shard): row i is the vector it gave id i."""

    image_ids: list[str] | pa.Array
    parts: np.ndarray
    items: np.ndarray

    def __post_init__(self) -> None:
        self.image_ids = string_array(self.image_ids)
        self.parts = np.asarray(self.parts, np.int32)
        self.items = np.asarray(self.items, np.int32)
        if not len(self.image_ids) == len(self.parts) == len(self.items):
            raise ValueError(
                f"crawl keys of different lengths: {len(self.image_ids)} ids, "
                f"{len(self.parts)} parts, {len(self.items)} items"
            )

    @classmethod
    def from_table(cls, table: pa.Table) -> "CrawlKeys":
        return cls(
            table.column("image_id"),
            table.column("part").to_numpy(),
            table.column("item").to_numpy(),
        )

    def __len__(self) -> int:
        return len(self.image_ids)


class IndexShard:
    """One shard of the crawl index as its searcher holds it: the index and its keys.

    A pool of these (one per shard, `curate.core.stage.ShardPool`) is what retrieval searches;
    a single index over the whole crawl is the pool of one shard.
    """

    def __init__(self, index: KnnIndex, keys: CrawlKeys, number: int = 0) -> None:
        if len(keys) != index.ntotal:
            raise ValueError(f"{len(keys)} crawl keys for an index of {index.ntotal} vectors")
        self.index, self.keys, self.number = index, keys, number

    def search(self, queries: np.ndarray, k: int) -> pa.Table:
        """This shard's k best rows of every query, as HITS rows (fewer when it holds fewer)."""
        sims, ids = self.index.search(queries, k)
        queries_of, ranks = np.nonzero(ids >= 0)
        rows = ids[queries_of, ranks]
        return pa.table(
            {
                "query": pa.array(queries_of, pa.int32()),
                "similarity": pa.array(sims[queries_of, ranks], pa.float32()),
                "shard": pa.array(np.full(len(rows), self.number), pa.int32()),
                "row": pa.array(rows, pa.int64()),
                "image_id": self.keys.image_ids.take(pa.array(rows)),
                "part": pa.array(self.keys.parts[rows], pa.int32()),
                "item": pa.array(self.keys.items[rows], pa.int32()),
            },
            schema=HITS,
        )

    def describe(self) -> dict:
        return self.index.describe()


def merge_hits(per_shard: Sequence[pa.Table], k: int) -> tuple[pa.Table, np.ndarray]:
    """The k best hits of every query over the shards' HITS tables: (the hits sorted by query
    then rank, their rank). Best = highest similarity, ties by (shard, row)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = pa.concat_tables(per_shard) if per_shard else HITS.empty_table()
    if hits.num_rows == 0:
        return hits, np.empty(0, np.int64)
    query = hits.column("query").to_numpy()
    similarity = hits.column("similarity").to_numpy()
    order = np.lexsort(
        (hits.column("row").to_numpy(), hits.column("shard").to_numpy(), -similarity, query)
    )
    ordered = query[order]
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered)
    kept = rank < k
    return hits.take(pa.array(order[kept])), rank[kept]


def combined_description(described: Sequence[dict]) -> dict:
    """One description of a sharded index from its shards' (`KnnIndex.describe`): their common
    settings, the vectors of all of them, and how many shards."""
    first = dict(described[0])
    first["ntotal"] = sum(d["ntotal"] for d in described)
    first["gpu"] = any(d["gpu"] for d in described)
    first["shards"] = len(described)
    return first
