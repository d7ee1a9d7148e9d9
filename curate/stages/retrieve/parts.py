"""The retrieve stage's work: one part per (seed set, policy step), over a crawl index built once.

The crawl's kNN index (exact below `flat_max` images, IVF-PQ above) is built in one task and
saved with its keys, so every kNN policy of every seed set searches the same index; cluster and
balanced policies read the cluster stage's outputs instead.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.knn_index import KnnIndex
from curate.core.shards import PartResult, ShardWriter, shard_name, write_shard
from curate.core.vectors import EmbeddingTable, iter_embeddings, read_embeddings
from curate.stages.cluster.centroids import CENTROIDS, embedded_rows, load_hierarchy
from curate.stages.cluster.kmeans import assign
from curate.stages.retrieve.policies import (
    CrawlKeys,
    retrieve_as_is,
    retrieve_balanced,
    retrieve_cluster,
    retrieve_knn,
)
from curate.stages.retrieve.seed_sets import PolicyStep
from schemas.shards import RETRIEVE

INDEX = "crawl.index"
KEYS = "crawl_keys.parquet"


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


@dataclass(frozen=True)
class IndexOptions:
    flat_max: int
    nlist: int | None
    pq_m: int | None
    nprobe: int | None
    seed: int
    min_seeds: int


def build_crawl_index(crawl: CrawlInputs, options: IndexOptions) -> dict:
    """Build the crawl's kNN index and its keys, streaming shard by shard; kept if present."""
    index_path, keys_path = crawl.index_dir / INDEX, crawl.index_dir / KEYS
    if index_path.exists() and keys_path.exists():
        return KnnIndex.load(index_path).describe()
    rows = embedded_rows(list(crawl.embed))
    if rows == 0:
        raise ValueError("nothing to search: the embed stage produced no embeddings")
    # The dimension from the first non-empty shard: a part whose images all failed has none.
    first = next(batch for batch in iter_embeddings(list(crawl.embed)) if len(batch))
    index = KnnIndex.create(
        first.vectors.shape[1],
        rows,
        flat_max=options.flat_max,
        nlist=options.nlist,
        pq_m=options.pq_m,
        nprobe=options.nprobe,
    )
    if index.needs_training:
        # The index says how many training vectors its lists need (64 per list).
        sample = read_embeddings(list(crawl.embed), sample=index.train_size, seed=options.seed)
        index.train(sample.vectors)
    keys = []
    for path in crawl.embed:
        embedded = read_embeddings([path])
        index.add(embedded.vectors)
        keys.append(
            pa.table(
                {
                    "image_id": pa.array(embedded.image_ids, pa.string()),
                    "part": pa.array(embedded.parts, pa.int32()),
                    "item": pa.array(embedded.items, pa.int32()),
                }
            )
        )
    crawl.index_dir.mkdir(parents=True, exist_ok=True)
    # Keys first: the index file is what marks the pair complete.
    write_shard(pa.concat_tables(keys), keys_path)
    index.save(index_path)  # atomic
    return index.describe()


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
    part: RetrievePart, crawl: CrawlInputs, options: IndexOptions, out_dir: Path
) -> PartResult:
    """Apply one policy step of one seed set and write its RETRIEVE shard."""
    started = time.perf_counter()
    kind, value = part.step.kind, part.step.value
    if kind == "as-is":
        # The seed images themselves: their ids and places, not their vectors.
        keys = pq.read_table(list(part.seed_embed), columns=["image_id", "part", "item"])
        ids = EmbeddingTable(
            image_ids=keys.column("image_id").combine_chunks(),
            parts=keys.column("part").to_numpy(),
            items=keys.column("item").to_numpy(),
            vectors=np.empty((keys.num_rows, 0), np.float32),
        )
        return _write(part, keys.num_rows, retrieve_as_is(part.seed_set, ids), out_dir, started)
    if kind == "knn" and part.cap is None:
        return _retrieve_knn_streaming(part, crawl, out_dir, started)
    seeds = read_embeddings(list(part.seed_embed))
    if kind == "knn":
        table = cap_images(
            retrieve_knn(
                part.seed_set,
                seeds,
                KnnIndex.load(crawl.index_dir / INDEX),
                _crawl_keys(crawl),
                int(value or 1),
            ),
            part.cap,
        )
    elif kind == "cluster":
        centroids = np.load(crawl.cluster_dir / CENTROIDS)
        seed_clusters, _ = assign(seeds.vectors, centroids)
        table = retrieve_cluster(
            part.seed_set,
            seed_clusters,
            (pq.read_table(path) for path in crawl.cluster),
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


def _crawl_keys(crawl: CrawlInputs) -> CrawlKeys:
    keys = pq.read_table(crawl.index_dir / KEYS)
    return CrawlKeys(
        image_ids=keys.column("image_id"),
        parts=keys.column("part").to_numpy(),
        items=keys.column("item").to_numpy(),
    )


def _retrieve_knn_streaming(
    part: RetrievePart, crawl: CrawlInputs, out_dir: Path, started: float
) -> PartResult:
    """kNN without a cap, seed block by seed block straight into the shard: memory is one block
    of seeds and its matches, whatever the seed set's size (ImageNet-22k: 14M seeds, 56M rows)."""
    index = KnnIndex.load(crawl.index_dir / INDEX)
    keys = _crawl_keys(crawl)
    seeds = 0
    with ShardWriter(out_dir / shard_name(part.index), RETRIEVE) as writer:
        for block in iter_embeddings(list(part.seed_embed)):
            writer.write(retrieve_knn(part.seed_set, block, index, keys, int(part.step.value or 1)))
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
