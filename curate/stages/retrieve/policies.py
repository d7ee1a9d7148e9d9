"""Seed-set retrieval policies (DINOv2, appendix A; Vo et al. 2024 for `balanced`): each turns a
seed set and the embedded crawl into RETRIEVE rows.

- as-is: the seed images themselves (ImageNet-22k, GLDv2, Mapillary SLS enter whole);
- knn: the k nearest crawl images of every seed image (k = 4 for ImageNet-22k, 32 for IN-1k);
- cluster: from every crawl k-means cluster holding more than `min_seeds` seed images, up to
  `per_cluster` crawl images (10,000 in LVD), at most `cap` in all (1M in LVD);
- balanced: a hierarchically balanced sample of the crawl of a given size.

Picks that are not ranked by similarity (cluster, balanced) take the crawl images with the
smallest `id_hash(image_id, seed)`: a uniform random choice that needs no global shuffle, is the
same however the crawl is split into parts, and can be made while streaming with memory bounded
by what is kept. An image retrieved by several seeds gets one row per match; the curated stage
keeps it once and `collisions` counts them.
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.stage import ShardPool
from curate.core.vectors import BLOCK, EmbeddingTable, iter_embeddings
from curate.stages.cluster.hierarchy import Hierarchy, allocate_budget, even_split, water_level
from curate.stages.cluster.kmeans import assign
from curate.stages.retrieve.knn_search import merge_hits
from curate.stages.retrieve.knn_search import string_array as _string_array
from schemas.shards import RETRIEVE

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MERGE_ROWS = 1 << 20  # candidate rows buffered between two prunings of the kept set


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: spreads FNV's weak high bits over the whole word."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_hash(image_ids: Iterable[str] | pa.Array, seed: int = 0) -> np.ndarray:
    """uint64 per id: FNV-1a of its UTF-8 bytes from a seed-dependent start, then SplitMix64.

    Vectorised over the ids (one pass per byte position), so hashing a shard costs far less
    than reading it.
    """
    ids = _string_array(image_ids).cast(pa.large_string())
    if ids.null_count:
        raise ValueError(f"{ids.null_count} image ids are null")
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + n + 1]
    data = ids.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(1, np.uint8)
    if not len(data):
        data = np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):
        start = _splitmix64(np.array([seed % (1 << 64)], np.uint64))[0] ^ _FNV_OFFSET
        h = np.full(n, start, np.uint64)
        uniform = n == 0 or lengths.min() == lengths.max()
        for j in range(int(lengths.max()) if n else 0):
            byte = data[np.minimum(starts + j, len(data) - 1)].astype(np.uint64)
            mixed = (h ^ byte) * _FNV_PRIME
            h = mixed if uniform else np.where(lengths > j, mixed, h)
        return _splitmix64(h)


def _table(
    seed_set: str,
    method: str,
    *,
    image_ids: pa.Array,
    parts: np.ndarray,
    items: np.ndarray,
    ranks: np.ndarray,
    similarity: np.ndarray,
    seed_ids: pa.Array | None = None,
    cluster_ids: np.ndarray | None = None,
) -> pa.Table:
    n = len(image_ids)
    return pa.table(
        {
            "seed_set": pa.array([seed_set] * n, pa.string()),
            "seed_id": seed_ids if seed_ids is not None else pa.nulls(n, pa.string()),
            "image_id": image_ids,
            "part": pa.array(parts, pa.int32()),
            "item": pa.array(items, pa.int32()),
            "rank": pa.array(ranks, pa.int32()),
            "similarity": pa.array(similarity, pa.float32()),
            "method": pa.array([method] * n, pa.string()),
            "cluster_id": (
                pa.array(cluster_ids, pa.int32())
                if cluster_ids is not None
                else pa.nulls(n, pa.int32())
            ),
        },
        schema=RETRIEVE,
    )


def retrieve_as_is(seed_set: str, seeds: EmbeddingTable) -> pa.Table:
    """Every seed image, as itself (similarity 1); rank is its order in the seed set."""
    ids = _string_array(seeds.image_ids)
    return _table(
        seed_set,
        "as-is",
        image_ids=ids,
        parts=seeds.parts,
        items=seeds.items,
        ranks=np.arange(len(ids)),
        similarity=np.ones(len(ids), np.float32),
        seed_ids=ids,
    )


def retrieve_knn(
    seed_set: str,
    seeds: EmbeddingTable,
    shards: ShardPool,
    k: int,
    *,
    batch: int = 4096,
) -> pa.Table:
    """The k nearest crawl images of every seed image (rank 0 = nearest), cosine similarity.

    shards: the crawl index's searchers (`knn_search.IndexShard`s, in a pool or this process):
    each block of seeds goes to every shard once and their k best are merged."""
    if k < 1:
        raise ValueError(f"knn retrieval needs k >= 1, got {k}")
    seed_ids = _string_array(seeds.image_ids)
    tables = []
    for start in range(0, len(seed_ids), batch):
        hits, ranks = merge_hits(shards.map("search", seeds.vectors[start : start + batch], k), k)
        queries = hits.column("query").to_numpy()
        tables.append(
            _table(
                seed_set,
                "knn",
                image_ids=_string_array(hits.column("image_id")),
                parts=hits.column("part").to_numpy(),
                items=hits.column("item").to_numpy(),
                ranks=ranks,
                similarity=hits.column("similarity").to_numpy(),
                seed_ids=seed_ids.take(pa.array(queries + start)),
            )
        )
    return pa.concat_tables(tables) if tables else RETRIEVE.empty_table()


class _SmallestPerGroup:
    """Keeps, while rows stream in, each group's rows with the smallest hashes: at most
    limit(seen) of them, where `seen` counts every row offered per group so far.

    Memory is the kept rows plus one buffer of _MERGE_ROWS candidates.
    """

    def __init__(self, groups: int, limit: Callable[[np.ndarray], np.ndarray]) -> None:
        self.seen = np.zeros(groups, np.int64)
        self._limit = limit
        self._pending: list[tuple[np.ndarray, np.ndarray, pa.Table]] = []
        self._pending_rows = 0
        self.group = np.empty(0, np.int64)
        self.hash = np.empty(0, np.uint64)
        self.rows: pa.Table | None = None

    def offer(self, group: np.ndarray, hashes: np.ndarray, rows: pa.Table) -> None:
        self.seen += np.bincount(group, minlength=len(self.seen))
        self._pending.append((group, hashes, rows))
        self._pending_rows += len(group)
        if self._pending_rows >= max(_MERGE_ROWS, len(self.group)):
            self._prune()

    def _prune(self) -> None:
        if not self._pending:
            return
        parts = ([(self.group, self.hash, self.rows)] if self.rows is not None else []) + list(
            self._pending
        )
        group = np.concatenate([p[0] for p in parts])
        hashes = np.concatenate([p[1] for p in parts])
        rows = pa.concat_tables([p[2] for p in parts])
        order = np.lexsort((hashes, group))
        sorted_group = group[order]
        rank = np.arange(len(order)) - np.searchsorted(sorted_group, sorted_group)
        keep = order[rank < self._limit(self.seen)[sorted_group]]
        self.group, self.hash, self.rows = group[keep], hashes[keep], rows.take(pa.array(keep))
        self._pending, self._pending_rows = [], 0

    def kept(self) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
        """(group, rank within group, rows), sorted by group then hash."""
        self._prune()
        rank = np.arange(len(self.group)) - np.searchsorted(self.group, self.group)
        return self.group, rank, self.rows


def _first_per_group(group: np.ndarray, rank: np.ndarray, take: np.ndarray) -> np.ndarray:
    """Positions of the rows whose rank within their group is below that group's `take`."""
    return np.flatnonzero(rank < take[group])


def retrieve_cluster(
    seed_set: str,
    seed_clusters: np.ndarray,
    crawl_clusters: Iterable[pa.Table | pa.RecordBatch],
    *,
    per_cluster: int = 10_000,
    min_seeds: int = 3,
    cap: int | None = 1_000_000,
    seed: int = 0,
) -> pa.Table:
    """Crawl images of the clusters holding more than `min_seeds` seed images.

    seed_clusters: the crawl k-means cluster of every seed image. crawl_clusters: CLUSTER tables
    (streamed once). Each selected cluster gives its `per_cluster` images of smallest
    id_hash(image_id, seed) (all if fewer); with `cap`, the total is cut to `cap` spread evenly
    over the selected clusters. similarity = 1 - distance to the centroid; rank = pick order.
    """
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be >= 1, got {per_cluster}")
    if cap is not None and cap < 0:
        raise ValueError(f"cap must be >= 0 or None, got {cap}")
    ids, counts = np.unique(np.asarray(seed_clusters, np.int64), return_counts=True)
    selected = ids[counts > min_seeds]
    if not len(selected):
        return RETRIEVE.empty_table()

    def limit(seen: np.ndarray) -> np.ndarray:
        # The final share of a cluster is at most the water level of the counts seen so far
        # plus one (more rows only lower it), so rows beyond it can be dropped now.
        room = np.minimum(seen, per_cluster)
        if cap is None or room.sum() <= cap:
            return np.full(len(seen), per_cluster, np.int64)
        return np.full(len(seen), min(per_cluster, water_level(room, cap) + 1), np.int64)

    kept = _SmallestPerGroup(len(selected), limit)
    for table in crawl_clusters:
        cluster_ids = table.column("cluster_id").to_numpy(zero_copy_only=False).astype(np.int64)
        position = np.searchsorted(selected, cluster_ids)
        position = np.minimum(position, len(selected) - 1)
        rows = np.flatnonzero(selected[position] == cluster_ids)
        if not len(rows):
            continue
        picked = table.select(["image_id", "part", "item", "distance"]).take(pa.array(rows))
        if isinstance(picked, pa.RecordBatch):
            picked = pa.Table.from_batches([picked])
        kept.offer(position[rows], id_hash(picked.column("image_id"), seed), picked)
    group, rank, rows = kept.kept()
    if rows is None:
        return RETRIEVE.empty_table()
    room = np.minimum(kept.seen, per_cluster)
    take = room if cap is None else even_split(room, cap, np.random.default_rng(seed))
    chosen = _first_per_group(group, rank, take)
    rows = rows.take(pa.array(chosen))
    return _table(
        seed_set,
        "cluster",
        image_ids=_string_array(rows.column("image_id")),
        parts=rows.column("part").to_numpy(zero_copy_only=False),
        items=rows.column("item").to_numpy(zero_copy_only=False),
        ranks=rank[chosen],
        similarity=1.0 - rows.column("distance").to_numpy(zero_copy_only=False),
        cluster_ids=selected[group[chosen]],
    )


def _crawl_batches(crawl: EmbeddingTable | Sequence[Path]) -> Iterable[EmbeddingTable]:
    if isinstance(crawl, EmbeddingTable):
        return (crawl.slice(s, s + BLOCK) for s in range(0, len(crawl), BLOCK))
    return iter_embeddings([Path(p) for p in crawl])


def retrieve_balanced(
    seed_set: str,
    crawl: EmbeddingTable | Sequence[Path],
    hierarchy: Hierarchy,
    budget: int,
    *,
    seed: int = 0,
) -> pa.Table:
    """A hierarchically balanced sample of min(budget, N) crawl images (Vo et al. 2024).

    crawl: the crawl's embeddings, or its EMBED shards, read twice (leaf sizes, then picks) so
    memory is the picks plus one batch. The budget is spread evenly down the hierarchy
    (`allocate_budget`); within a leaf the images of smallest id_hash are taken. cluster_id is
    the finest level's cluster, similarity the cosine to its centroid.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    leaves = hierarchy.centroids[0]
    sizes = np.zeros(len(leaves), np.int64)
    for batch in _crawl_batches(crawl):
        sizes += np.bincount(assign(batch.vectors, leaves)[0], minlength=len(leaves))
    take = allocate_budget(hierarchy.leaf_paths(), sizes, budget, seed=seed)
    kept = _SmallestPerGroup(len(leaves), lambda seen: take)
    for batch in _crawl_batches(crawl):
        leaf, distance = assign(batch.vectors, leaves)
        rows = np.flatnonzero(take[leaf] > 0)
        if not len(rows):
            continue
        picked = pa.table(
            {
                "image_id": batch.image_ids.take(pa.array(rows)),
                "part": batch.parts[rows],
                "item": batch.items[rows],
                "distance": distance[rows],
            }
        )
        kept.offer(leaf[rows].astype(np.int64), id_hash(picked.column("image_id"), seed), picked)
    group, rank, rows = kept.kept()
    if rows is None:
        return RETRIEVE.empty_table()
    return _table(
        seed_set,
        "balanced",
        image_ids=_string_array(rows.column("image_id")),
        parts=rows.column("part").to_numpy(zero_copy_only=False),
        items=rows.column("item").to_numpy(zero_copy_only=False),
        ranks=rank,
        similarity=1.0 - rows.column("distance").to_numpy(zero_copy_only=False),
        cluster_ids=group,
    )


def collisions(tables: Iterable[pa.Table]) -> dict:
    """How often images were picked more than once across RETRIEVE tables.

    rows: retrieve rows; images: distinct images; collided_images: images picked by more than
    one row; extra_rows: rows beyond the first per image; cross_set_images: images picked by
    more than one seed set.
    """
    partials: list[pa.Table] = []
    pending = 0
    rows = 0

    def merged(parts: list[pa.Table]) -> pa.Table:
        return (
            pa.concat_tables(parts)
            .group_by(["image_id", "seed_set"])
            .aggregate([("matches", "sum")])
            .rename_columns(["image_id", "seed_set", "matches"])
        )

    for table in tables:
        rows += table.num_rows
        counted = (
            table.select(["image_id", "seed_set"])
            .group_by(["image_id", "seed_set"])
            .aggregate([("image_id", "count")])
            .rename_columns(["image_id", "seed_set", "matches"])
        )
        partials.append(counted)
        pending += counted.num_rows
        if len(partials) > 1 and pending > _MERGE_ROWS:
            partials = [merged(partials)]
            pending = partials[0].num_rows
    if not partials:
        return dict.fromkeys(
            ["rows", "images", "collided_images", "extra_rows", "cross_set_images"], 0
        )
    per_set = merged(partials)
    per_image = per_set.group_by("image_id").aggregate([("matches", "sum"), ("seed_set", "count")])
    images = per_image.num_rows
    return {
        "rows": rows,
        "images": images,
        "collided_images": int(pc.sum(pc.greater(per_image["matches_sum"], 1)).as_py() or 0),
        "extra_rows": rows - images,
        "cross_set_images": int(pc.sum(pc.greater(per_image["seed_set_count"], 1)).as_py() or 0),
    }
