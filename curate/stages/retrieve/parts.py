"""The retrieve stage's work: one part per (seed set, policy step), over a crawl index built once.

The crawl's kNN index (exact below `flat_max` images, IVF-PQ above) is built once, in shards
(crawl_index.py), and every kNN policy of every seed set searches it through the same pool of
shard searchers (`ShardPool`); cluster and balanced policies read the cluster stage's outputs.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.shards import PartResult, ShardWriter, shard_name, write_shard
from curate.core.stage import ShardPool
from curate.core.storage import fetch, read_table
from curate.core.vectors import EmbeddingTable, iter_embeddings, read_embeddings
from curate.stages.cluster.centroids import CENTROIDS, load_hierarchy
from curate.stages.cluster.kmeans import assign
from curate.stages.retrieve.crawl_index import IndexOptions, local_shards
from curate.stages.retrieve.policies import (
    retrieve_as_is,
    retrieve_balanced,
    retrieve_cluster,
    retrieve_knn,
)
from curate.stages.retrieve.seed_sets import PolicyStep
from schemas.shards import RETRIEVE


@dataclass(frozen=True)
class RetrievePart:
    index: int
    seed_set: str
    step: PolicyStep
    cap: int | None
    seed_embed: tuple[Path, ...]

    def __str__(self) -> str:
        return f"seed set {self.seed_set} ({self.step})"


@dataclass(frozen=True)
class CrawlInputs:
    """Where the crawl's embed and cluster outputs of the job are."""

    embed: tuple[Path, ...]
    cluster: tuple[Path, ...]
    cluster_dir: Path  # centroids and hierarchy
    index_dir: Path


def cap_images(table: pa.Table, cap: int | None) -> pa.Table:
    """Keep the rows of the `cap` distinct images with the best similarity."""
    if cap is None or table.num_rows == 0:
        return table
    best = table.group_by("image_id").aggregate([("similarity", "max")])
    if best.num_rows <= cap:
        return table
    order = pc.sort_indices(best, [("similarity_max", "descending"), ("image_id", "ascending")])
    keep = pc.take(best.column("image_id"), order[:cap])
    return table.filter(pc.is_in(table.column("image_id"), value_set=keep))


def retrieve_part(
    part: RetrievePart,
    crawl: CrawlInputs,
    options: IndexOptions,
    out_dir: Path,
    searchers: ShardPool | None = None,
) -> PartResult:
    """Apply one policy step of one seed set and write its RETRIEVE shard.

    searchers: the crawl index's shard searchers (the stage starts them once for every kNN
    part); None loads every shard here, which only suits an index that fits one process."""
    started = time.perf_counter()
    kind, value = part.step.kind, part.step.value
    if kind == "as-is":
        # The seed images themselves: their ids and places, not their vectors.
        keys = read_table(list(part.seed_embed), ["image_id", "part", "item"])
        ids = EmbeddingTable(
            image_ids=keys.column("image_id").combine_chunks(),
            parts=keys.column("part").to_numpy(),
            items=keys.column("item").to_numpy(),
            vectors=np.empty((keys.num_rows, 0), np.float32),
        )
        return _write(part, keys.num_rows, retrieve_as_is(part.seed_set, ids), out_dir, started)
    if kind == "knn" and part.cap is None:
        return _retrieve_knn_streaming(part, _searchers(crawl, searchers), out_dir, started)
    seeds = read_embeddings(list(part.seed_embed))
    if kind == "knn":
        table = cap_images(
            retrieve_knn(
                part.seed_set,
                seeds,
                _searchers(crawl, searchers),
                int(value or 1),
            ),
            part.cap,
        )
    elif kind == "cluster":
        centroids = np.load(fetch(crawl.cluster_dir / CENTROIDS))
        seed_clusters, _ = assign(seeds.vectors, centroids)
        table = retrieve_cluster(
            part.seed_set,
            seed_clusters,
            (read_table(path) for path in crawl.cluster),
            per_cluster=int(value or 1),
            min_seeds=options.min_seeds,
            cap=part.cap,
            seed=options.seed,
        )
    else:
        table = retrieve_balanced(
            part.seed_set,
            list(crawl.embed),
            load_hierarchy(crawl.cluster_dir),
            min(int(value or 1), part.cap or int(value or 1)),
            seed=options.seed,
        )
    return _write(part, len(seeds.image_ids), table, out_dir, started)


def _searchers(crawl: CrawlInputs, searchers: ShardPool | None) -> ShardPool:
    return local_shards(crawl.index_dir) if searchers is None else searchers


def _retrieve_knn_streaming(
    part: RetrievePart, shards: ShardPool, out_dir: Path, started: float
) -> PartResult:
    """kNN without a cap, seed block by seed block straight into the shard: memory is one block
    of seeds and its matches, whatever the seed set's size (ImageNet-22k: 14M seeds, 56M rows)."""
    seeds = 0
    with ShardWriter(out_dir / shard_name(part.index), RETRIEVE) as writer:
        for block in iter_embeddings(list(part.seed_embed)):
            writer.write(retrieve_knn(part.seed_set, block, shards, int(part.step.value or 1)))
            seeds += len(block)
    assert writer.info is not None
    return PartResult(
        part=part.index,
        rows_in=seeds,
        rows_out=writer.info.rows,
        shards={"data": writer.info},
        seconds=time.perf_counter() - started,
    )


def _write(
    part: RetrievePart, seeds: int, table: pa.Table, out_dir: Path, started: float
) -> PartResult:
    info = write_shard(table, out_dir / shard_name(part.index))
    return PartResult(
        part=part.index,
        rows_in=seeds,
        rows_out=table.num_rows,
        shards={"data": info},
        seconds=time.perf_counter() - started,
    )
